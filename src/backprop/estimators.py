"""scikit-learn's ``MLPClassifier`` and ``MLPRegressor``, trained by backprop's compiled core.

The two classes take scikit-learn's parameters with scikit-learn's meanings (and the same
defaults), set the same fitted attributes and follow the same stopping rules, so a script
written for ``sklearn.neural_network`` runs unchanged with the import swapped::

    from backprop.estimators import MLPClassifier    # instead of sklearn.neural_network
    clf = MLPClassifier(hidden_layer_sizes=(100,), alpha=1e-4, random_state=0).fit(X, y)

What scikit-learn's MLP does, and how it is done here:

- The network is a ``backprop.Network`` of Dense layers (``network_``) whose last layer
  applies the output function (``out_activation_``: identity, logistic or softmax) and
  trains with the matching built-in loss (mse, binary or categorical cross-entropy), so a
  whole minibatch step runs in the compiled core.  Each loss is paired with its canonical
  output function, so dLoss/dz is ``p - y`` for all of them, as in scikit-learn.  The
  Poisson loss (output exp) has no built-in twin: its network ends linear and its loss
  is computed here, in NumPy.
- The loss of a minibatch of ``B`` rows (or of sample weight ``W = sum(w)``) is
  ``mean_loss + alpha / (2 B) * sum ||W_l||^2`` over the weight matrices (not the
  intercepts); its gradient adds ``alpha * W_l / B`` to each weight gradient (the core's
  ``l2`` penalty).
- ``solver='sgd'`` is ``backprop.SGD`` (momentum, Nesterov), ``'adam'`` is ``backprop.Adam``;
  'constant', 'invscaling' and 'adaptive' learning rates, ``tol`` / ``n_iter_no_change``,
  early stopping on the validation score and ``best_loss_`` follow scikit-learn's rules.
- ``solver='lbfgs'`` is SciPy's L-BFGS-B over the network's flat parameter vector, each
  evaluation one pass of the core over every row (loss and gradient, the penalty
  included), with scikit-learn's ``max_iter``, ``max_fun``, ``tol`` (``gtol``) and
  convergence warning.
- Training runs in X's precision, float32 or float64 (other input is validated to
  float64), as scikit-learn's does; ``dtype`` forces one.
- Weights and intercepts start as scikit-learn draws them (Glorot uniform, from the same
  ``random_state`` draws in the same order) and minibatches are shuffled with the same
  draws, so in float64 the two libraries train to the same numbers (tested).

Known differences: Adam adds ``epsilon`` to ``sqrt(v_hat)`` (PyTorch's placement) where
scikit-learn adds it to ``sqrt(v)``, a difference of order ``epsilon``; the log-losses
are computed from the logits without clipping the probabilities; a minibatch whose sample
weights are all zero is skipped; a minibatch step that would make the weights non-finite
is refused (the weights stay the last finite ones), and an L-BFGS fit that reaches weights
where the loss overflows raises with its starting weights.  scikit-learn's private state
(``_optimizer``, its scratch lists) does not exist: ``network_`` holds the network and its
optimizer.  Extras: ``dtype``, ``precision`` ("bfloat16": mixed precision, see
``Network``; it trains in float32), ``n_threads``, ``batch_norm`` (batch normalisation
after each hidden Dense layer) and ``dropout``.

scikit-learn is optional.  When it is installed (version 1.6 or later) the estimators
derive from its ``BaseEstimator`` and validate input with ``sklearn.utils.validation``,
so they pass its estimator checks and work in ``clone``, ``Pipeline``, ``GridSearchCV``
and ``cross_val_score``.  Without it they work alone, with small fallbacks below
(``solver='lbfgs'`` needs SciPy).
"""
import contextlib
import functools
import inspect
import math
import numbers
import types
import warnings

import numpy as np

from backprop import training
from backprop._core import MAX_THREADS
from backprop._threads import limited
from backprop.layers import Activation, BatchNorm, Dense, Dropout
from backprop.network import Network
from backprop.optim import SGD, Adam

try:                    # for solver='lbfgs' (SciPy comes with scikit-learn)
    from scipy.optimize import minimize
except ImportError:
    minimize = None

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning, DataConversionWarning, NotFittedError
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import type_of_target
    from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
    HAVE_SKLEARN = True
except ImportError:     # scikit-learn (>= 1.6) is absent: the part of its contract used here
    HAVE_SKLEARN = False

    class NotFittedError(ValueError, AttributeError):
        """Raised when a method that needs a fitted estimator is called before ``fit``."""

    class ConvergenceWarning(UserWarning):
        """The solver stopped at ``max_iter`` before meeting ``tol``."""

    class DataConversionWarning(UserWarning):
        """The input was converted (a column vector ``y`` to 1-D)."""

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
        _estimator_type = "classifier"

        def score(self, X, y, sample_weight=None):
            """Mean accuracy of ``predict(X)`` against ``y`` (all labels of a row must match)."""
            return _accuracy(np.asarray(y), self.predict(X), sample_weight)

    class RegressorMixin:
        _estimator_type = "regressor"

        def score(self, X, y, sample_weight=None):
            """The coefficient of determination R^2 of ``predict(X)``, averaged over outputs."""
            return _r2(np.asarray(y, dtype=np.float64), self.predict(X), sample_weight)

    def check_random_state(seed):
        if seed is None:
            return np.random.mtrand._rand
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            return np.random.RandomState(seed)
        if isinstance(seed, np.random.RandomState):
            return seed
        raise ValueError(f"random_state must be None, an int or a numpy.random.RandomState, "
                         f"got {seed!r}")

    class available_if:
        """A method that exists only where ``check(estimator)`` holds (scikit-learn's
        decorator): ``check`` raises AttributeError or returns False otherwise."""

        def __init__(self, check):
            self.check = check

        def __call__(self, method):
            self.method = method
            functools.update_wrapper(self, method)
            return self

        def __get__(self, obj, owner=None):
            if obj is None:
                return self.method
            missing = f"This {type(obj).__name__!r} has no attribute {self.method.__name__!r}"
            try:
                available = self.check(obj)
            except Exception as error:
                raise AttributeError(missing) from error
            if not available:
                raise AttributeError(missing)
            return types.MethodType(self.method, obj)

    def check_is_fitted(estimator):
        if not estimator.__sklearn_is_fitted__():
            raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet; "
                                 "call 'fit' first.")

    def column_or_1d(y, *, warn=False):
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            if warn:
                warnings.warn("A column-vector y was passed when a 1d array was expected; "
                              "it is raveled.", DataConversionWarning, stacklevel=4)
            return y.ravel()
        if y.ndim != 1:
            raise ValueError(f"y should be a 1d array, got an array of shape {y.shape}")
        return y

    def type_of_target(y):
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] > 1:
            if y.dtype.kind in "biuf" and np.isin(y, (0, 1)).all():
                return "multilabel-indicator"
            return ("continuous-multioutput" if y.dtype.kind == "f" and np.any(y != y.round())
                    else "multiclass-multioutput")
        if y.dtype.kind == "f" and np.any(y != y.round()):
            return "continuous"
        return "multiclass" if len(np.unique(y)) > 2 else "binary"

    def _fallback_array(a, name, ndims, numeric):
        a = np.asarray(a)
        if a.dtype.kind == "c":
            raise ValueError(f"Complex data not supported in {name}")
        if a.dtype.kind in "OUS" and numeric:
            try:
                a = a.astype(np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}") from None
        if a.ndim not in ndims:
            # scikit-learn's wording ("Expected 2D array"), so code that matches it works
            raise ValueError(f"Expected {' or '.join(f'{n}D' for n in ndims)} array for "
                             f"{name}, got an array of shape {a.shape}")
        if a.dtype.kind in "biuf" and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinity")
        return a

    def validate_data(estimator, X, y="no_validation", *, reset=True, y_numeric=False, **_):
        if hasattr(X, "toarray"):
            raise TypeError("sparse X needs scikit-learn installed; pass X.toarray()")
        names = getattr(X, "columns", None)
        X = _fallback_array(X, "X", (2,), numeric=True)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        if X.shape[0] < 1 or X.shape[1] < 1:      # scikit-learn's wording again
            raise ValueError(f"Found array with {X.shape[0]} sample(s) and {X.shape[1]} "
                             f"feature(s) (shape={X.shape}); at least 1 of each is required")
        if reset:
            estimator.n_features_in_ = X.shape[1]
            if names is not None and all(isinstance(n, str) for n in names):
                estimator.feature_names_in_ = np.asarray(names, dtype=object)
        elif X.shape[1] != estimator.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} "
                             f"is expecting {estimator.n_features_in_} features as input")
        if isinstance(y, str) and y == "no_validation":
            return X
        if y is None:
            raise ValueError(f"{type(estimator).__name__} requires y to be passed, but the "
                             "target y is None")
        y = _fallback_array(y, "y", (1, 2), numeric=y_numeric)
        if len(y) != len(X):
            raise ValueError(f"X and y have different numbers of samples: {len(X)} and {len(y)}")
        return X, y

    def train_test_split(*arrays, random_state, test_size, stratify=None):
        # ShuffleSplit's rule (not stratified): the first ceil(test_size * n) rows of a
        # permutation are held out.
        n = len(arrays[0])
        order = random_state.permutation(n)
        test, train = order[:math.ceil(test_size * n)], order[math.ceil(test_size * n):]
        return [part for a in arrays for part in (a[train], a[test])]

_HIDDEN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
                       "relu": "relu"}      # scikit-learn's names -> backprop's
_PREDICT_CHUNK = 1024                       # rows per forward pass when predicting
_DIVERGED = ("Solver produced non-finite parameter weights. The input data may contain large "
             "values and need to be preprocessed, or learning_rate_init is too large.")


# --------------------------------------------------------------------------- output heads
# scikit-learn's output functions as the network's output activation and built-in loss.
# The reductions differ by constant factors: for k outputs, scikit-learn's loss is
# `loss_factor` times the built-in one, and its gradient, (p - y) / rows at the logits
# for every head, is `grad_scale` times the built-in one's:
#   softmax   categorical log-loss = cross_entropy                        1     1
#   logistic  log-loss summed over the outputs = k * binary_cross_entropy  k     k
#   identity  half squared error, mean over outputs = mse / 2             1/2   k/2
# (scikit-learn's squared-error gradient is that of the sum over the outputs, not of the
# mean its loss reports, hence k/2 for the gradient and 1/2 for the loss.)
_BUILT_IN = {"softmax": ("softmax", "cross_entropy"),
             "logistic": ("sigmoid", "binary_cross_entropy"),
             "identity": ("identity", "mse")}


def _loss_factors(head, k):
    """(loss_factor, grad_scale) of the table above."""
    return {"softmax": (1.0, 1.0), "logistic": (float(k), float(k)),
            "identity": (0.5, k / 2.0)}[head]


def _poisson(z, y=None):
    """exp(z) and, given targets y, the half Poisson deviance of each row (summed over the
    outputs), computed from the logits z."""
    p = np.exp(z)
    if y is None:
        return p, None
    with np.errstate(divide="ignore", invalid="ignore"):
        y_log_y = np.where(y > 0, y * np.log(np.where(y > 0, y, 1)), 0)
    return p, (y_log_y - y * z - y + p).sum(axis=1)


def _mean(values, weights):
    if weights is None:
        return float(values.sum()) / len(values)
    return float(values @ weights) / float(weights.sum())


def _accuracy(y_true, y_pred, sample_weight=None):
    correct = np.asarray(y_true == y_pred)
    if correct.ndim == 2:                          # multi-label: every label of the row
        correct = correct.all(axis=1)
    return _mean(correct.astype(np.float64),
                 None if sample_weight is None else np.asarray(sample_weight, np.float64))


def _r2(y_true, y_pred, sample_weight=None):
    """R^2 as scikit-learn's r2_score: averaged over outputs; a constant target scores 1
    when predicted exactly, else 0."""
    y_true = y_true.reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(y_true.shape)
    w = np.ones(len(y_true)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    residual = w @ (y_true - y_pred) ** 2
    total = w @ (y_true - (w @ y_true) / w.sum()) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(total > 0, 1 - residual / total, np.where(residual == 0, 1.0, 0.0))
    return float(scores.mean())


# --------------------------------------------------------------------------- parameters

def _check_number(owner, name, value, low, high, *, low_open=False, high_open=False,
                  integer=False):
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{owner}: {name} must be {'an int' if integer else 'a number'}, "
                        f"got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = (("(" if low_open else "[") + f"{low}, " +
                  ("inf)" if high is None else f"{high}" + (")" if high_open else "]")))
        raise ValueError(f"{owner}: {name} must be in {bounds}, got {value!r}")


def _check_choice(owner, name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {sorted(choices)}, got {value!r}")


def _threads(n):
    """A block with backprop's kernels on `n` threads (None: the setting as it is), which
    puts back exactly what was requested before (see backprop._threads)."""
    return contextlib.nullcontext() if n is None else limited(n)


def _rows(X, rows):
    """X[rows] as a dense array (X dense, or a SciPy CSR matrix densified batch by batch)."""
    part = X[rows]
    return part.toarray() if hasattr(part, "toarray") else part


# --------------------------------------------------------------------------- the estimators

def _stochastic_solver(estimator):
    """partial_fit exists for the minibatch solvers only: with solver='lbfgs',
    ``hasattr(estimator, 'partial_fit')`` is False, as in scikit-learn."""
    if estimator.solver not in ("sgd", "adam"):
        raise AttributeError("partial_fit is only available for stochastic optimizers. "
                             f"{estimator.solver} is not stochastic.")
    return True


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the layer stack, training."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=None, precision="float32", n_threads=None, batch_norm=False,
                 dropout=0.0):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.precision = precision
        self.n_threads = n_threads
        self.batch_norm = batch_norm
        self.dropout = dropout

    # ---- parameters

    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if np.iterable(sizes) else [sizes]
        for size in sizes:
            _check_number(type(self).__name__, "hidden_layer_sizes", size, 1, None, integer=True)
        return [int(size) for size in sizes]

    def _check_params(self):
        """Refuse bad parameters with an error naming them, before anything changes."""
        owner, check = type(self).__name__, _check_number
        _check_choice(owner, "solver", self.solver, {"sgd", "adam", "lbfgs"})
        _check_choice(owner, "activation", self.activation, set(_HIDDEN_ACTIVATIONS))
        _check_choice(owner, "learning_rate", self.learning_rate,
                      {"constant", "invscaling", "adaptive"})
        if self.dtype is not None:
            _check_choice(owner, "dtype", str(np.dtype(self.dtype)) if self.dtype in
                          (np.float32, np.float64) else self.dtype, {"float32", "float64"})
        _check_choice(owner, "precision", self.precision, {"float32", "bfloat16"})
        if self.precision == "bfloat16" and self.dtype is not None \
                and str(np.dtype(self.dtype)) != "float32":
            raise ValueError(f"{owner}: precision='bfloat16' trains in float32, but "
                             f"dtype={self.dtype!r}")
        self._hidden_sizes()
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            check(owner, "batch_size", self.batch_size, 1, None, integer=True)
        check(owner, "alpha", self.alpha, 0, None)
        check(owner, "learning_rate_init", self.learning_rate_init, 0, None, low_open=True)
        check(owner, "power_t", self.power_t, 0, None)
        check(owner, "max_iter", self.max_iter, 1, None, integer=True)
        check(owner, "tol", self.tol, 0, None)
        check(owner, "momentum", self.momentum, 0, 1)
        check(owner, "validation_fraction", self.validation_fraction, 0, 1, high_open=True)
        check(owner, "beta_1", self.beta_1, 0, 1, high_open=True)
        check(owner, "beta_2", self.beta_2, 0, 1, high_open=True)
        check(owner, "epsilon", self.epsilon, 0, None, low_open=True)
        if self.n_iter_no_change != np.inf:
            check(owner, "n_iter_no_change", self.n_iter_no_change, 1, None, integer=True)
        check(owner, "max_fun", self.max_fun, 1, None, integer=True)
        if self.n_threads is not None:
            check(owner, "n_threads", self.n_threads, 1, MAX_THREADS, integer=True)
        check(owner, "dropout", self.dropout, 0, 1, high_open=True)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping",
                     "batch_norm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{owner}: {name} must be True or False, "
                                f"got {getattr(self, name)!r}")
        if self.early_stopping and self.validation_fraction == 0:
            raise ValueError(f"{owner}: early_stopping=True needs validation_fraction > 0")
        if self.solver == "lbfgs":
            # L-BFGS needs the same objective at every evaluation: dropout's masks change
            # it, and batch norm's running statistics would move with every trial point.
            for name, off in (("dropout", 0.0), ("batch_norm", False)):
                if getattr(self, name) != off:
                    raise ValueError(f"{owner}: solver='lbfgs' cannot train with {name}="
                                     f"{getattr(self, name)!r}; use solver='adam' or 'sgd'")
            if minimize is None:
                raise ImportError(f"{owner}: solver='lbfgs' needs SciPy: pip install scipy")

    # ---- the layer stack (the one place it is built)

    def _build_network(self, layer_units, rs, dtype):
        """A Network in `dtype` for `layer_units` (inputs, hidden sizes..., outputs) with a
        linear last layer and a fresh optimizer.  With a RandomState `rs`, the weights and
        intercepts are drawn as scikit-learn draws them; with None they stay zero (the
        caller copies trained ones in)."""
        act = _HIDDEN_ACTIVATIONS[self.activation]
        output, loss = _BUILT_IN.get(self.out_activation_, ("identity", None))
        layers = []
        for fan_in, fan_out in zip(layer_units[:-2], layer_units[1:-1]):
            if self.batch_norm:     # Dense -> BatchNorm -> activation, as batch norm is used
                layers += [Dense(fan_in, fan_out, init="zeros"), BatchNorm(fan_out),
                           Activation(act)]
            else:
                layers.append(Dense(fan_in, fan_out, act, init="zeros"))
            if self.dropout > 0:
                layers.append(Dropout(self.dropout))
        layers.append(Dense(layer_units[-2], layer_units[-1], output, init="zeros"))
        # The network's seed only keys dropout masks; drawing it only then keeps the
        # random_state draws identical to scikit-learn's otherwise.
        seed = int(rs.randint(2 ** 31 - 1)) if self.dropout > 0 and rs is not None else 0
        if self.solver == "sgd":
            optimizer = SGD(lr=self.learning_rate_init, momentum=self.momentum,
                            nesterov=bool(self.nesterovs_momentum and self.momentum > 0))
        else:
            optimizer = Adam(lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2),
                             eps=self.epsilon)
        net = Network(layers, loss=loss, optimizer=optimizer, dtype=dtype, seed=seed,
                      precision=self.precision)
        if rs is not None:
            # Glorot & Bengio's uniform bound, with factor 2 instead of 6 for the logistic
            # function, for the weights and the intercepts alike (scikit-learn's _init_coef).
            factor = 2.0 if self.activation == "logistic" else 6.0
            for layer in self._dense_layers(net):
                bound = np.sqrt(factor / (layer.in_features + layer.out_features))
                layer.weight[...] = rs.uniform(-bound, bound,
                                               (layer.in_features, layer.out_features)).T
                layer.bias[...] = rs.uniform(-bound, bound, layer.out_features)
        return net

    @staticmethod
    def _dense_layers(net):
        return [layer for layer in net.layers if isinstance(layer, Dense)]

    def _snapshot(self):
        """The trained state: weights and batch norm's running statistics."""
        return self.network_.params.copy(), self.network_.buffers.copy()

    def _restore(self, snapshot):
        self.network_.params[...], self.network_.buffers[...] = snapshot

    # ---- fitted attributes that are views of the network

    @property
    def coefs_(self):
        """Weight matrices, list of arrays of shape (n_in, n_out), scikit-learn's
        orientation: views of the network's weights (writing to them changes it)."""
        return self._layer_arrays("coefs_", lambda layer: layer.weight.T)

    @coefs_.setter
    def coefs_(self, coefs):
        self._set_layer_arrays("coefs_", coefs, lambda layer: layer.weight.T)

    @property
    def intercepts_(self):
        """Intercept vectors, list of arrays of shape (n_out,): views of the network's."""
        return self._layer_arrays("intercepts_", lambda layer: layer.bias)

    @intercepts_.setter
    def intercepts_(self, intercepts):
        self._set_layer_arrays("intercepts_", intercepts, lambda layer: layer.bias)

    def _layer_arrays(self, name, view_of):
        preset = vars(self).get("_preset_arrays", {})
        if "network_" not in vars(self) and name in preset:
            return preset[name]
        check_is_fitted(self)
        return [view_of(layer) for layer in self._dense_layers(self.network_)]

    def _set_layer_arrays(self, name, values, view_of):
        if "network_" not in vars(self):
            # Before the first fit, as in scikit-learn: the starting weights of the next
            # partial_fit or warm-started fit (a cold fit draws its own).  Kept as given,
            # the list itself, so that filling it in place (coefs_[0] = ...) counts too;
            # checked when that fit starts.
            self._preset_arrays = {**vars(self).get("_preset_arrays", {}), name: values}
            return
        views = [view_of(layer) for layer in self._dense_layers(self.network_)]
        values = [np.asarray(v) for v in values]
        if len(values) != len(views) or any(v.shape != w.shape for v, w in zip(values, views)):
            raise ValueError(f"{name} must be {len(views)} arrays of shapes "
                             f"{[w.shape for w in views]}, got {[v.shape for v in values]}")
        for view, value in zip(views, values):
            view[...] = value

    # ---- training

    def fit(self, X, y, sample_weight=None):
        """Fit the model to data X and targets y.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Class labels (MLPClassifier; a 0/1 indicator matrix for multi-label) or
            real targets (MLPRegressor).
        sample_weight : array-like of shape (n_samples,), optional
            Weight of each sample in the loss.

        Returns
        -------
        self
        """
        return self._fit(X, y, sample_weight, incremental=False)

    def _fit(self, X, y, sample_weight, incremental):
        self._check_params()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        first_pass = not hasattr(self, "network_") or (not self.warm_start and not incremental)
        saved = dict(self.__dict__)
        try:                # a refused call changes nothing: everything up to the first step
            X, Y = self._validate_input(X, y, incremental, reset=first_pass)
            sample_weight = self._check_sample_weight(sample_weight, X)
            layer_units = [X.shape[1], *self._hidden_sizes(), Y.shape[1]]
            if not first_pass and layer_units != self._layer_units:
                raise ValueError(f"{type(self).__name__}: warm_start/partial_fit needs the same "
                                 f"layer sizes {self._layer_units}, got {layer_units}")
            rs = check_random_state(self.random_state)
            if first_pass:
                self._initialize(Y, layer_units, rs, X.dtype)
                preset = self.__dict__.pop("_preset_arrays", {})
                if incremental or self.warm_start:    # coefs_/intercepts_ set before
                    for name, values in preset.items():
                        setattr(self, name, values)
            elif not incremental:       # warm start: the weights go on, the optimizer restarts
                trained = self.network_
                fresh = self._build_network(layer_units, None, trained.dtype)
                if fresh.params.size != trained.params.size:
                    raise ValueError(f"{type(self).__name__}: warm_start needs the same layers; "
                                     "batch_norm or dropout changed since the last fit")
                self.network_ = fresh
                self._restore((trained.params, trained.buffers))
            validation = None
            if self.early_stopping and self.solver != "lbfgs":
                # after the weights: scikit-learn's order of draws
                X, Y, sample_weight, validation = self._split_validation(X, Y, sample_weight, rs)
            self.network_.precision = self.precision    # (a partial_fit after set_params)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        with _threads(self.n_threads):
            if self.solver == "lbfgs":
                self._fit_lbfgs(X, Y, sample_weight)
            else:
                self._fit_stochastic(X, Y, sample_weight, validation, rs, incremental)
        if not np.isfinite(self.network_.params).all():
            raise ValueError(_DIVERGED)
        return self

    def _check_sample_weight(self, sample_weight, X):
        if sample_weight is None:
            return None
        sw = np.asarray(sample_weight, dtype=np.float64)
        if sw.ndim != 1 or len(sw) != X.shape[0]:
            raise ValueError(f"sample_weight must have shape ({X.shape[0]},), got {sw.shape}")
        if not np.isfinite(sw).all() or (sw < 0).any():
            raise ValueError("sample_weight must be finite and non-negative")
        if not sw.any():
            raise ValueError("Sample weights must contain at least one non-zero number.")
        return sw

    def _initialize(self, Y, layer_units, rs, dtype):
        """Fresh network and fitted state, as scikit-learn's ``_initialize``."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(layer_units)
        self._layer_units = layer_units
        self.out_activation_ = self._output_activation()
        self.network_ = self._build_network(layer_units, rs, dtype)
        self._best_snapshot = self._snapshot()
        if self.solver != "lbfgs":      # scikit-learn sets these for its minibatch solvers only
            self._start_stopping_rules()

    def _start_stopping_rules(self):
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _fit_stochastic(self, X, Y, sample_weight, validation, rs, incremental):
        """The training loop: epochs of shuffled minibatches, then scikit-learn's stopping
        rules and learning-rate schedule after each epoch (`validation`: the held-out
        (X, Y, sample_weight) with early_stopping, else None)."""
        n = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                              "It is going to be clipped", stacklevel=4)
            batch_size = min(self.batch_size, n)
        order = np.arange(n)
        batches = training.minibatches(n, batch_size, training.refuses_one_row(self.network_))
        T = self._targets(Y)
        if not hasattr(self, "loss_curve_"):    # a warm start after solver='lbfgs'
            self._start_stopping_rules()
        self.network_.train()
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if self.shuffle:        # the permutation scikit-learn's shuffle() draws
                    order = order[rs.permutation(n)]
                total, diverged = 0.0, None
                try:
                    for start, stop in batches:
                        rows = order[start:stop]
                        total += self._train_batch(X, T, sample_weight, rows) * len(rows)
                except FloatingPointError as error:   # refused: the weights are the last good ones
                    if validation is None:
                        raise ValueError(f"{_DIVERGED} ({error}; epoch {self.n_iter_ + 1}.)"
                                         ) from None
                    diverged = error
                self.n_iter_ += 1
                self.loss_ = total / n if diverged is None else np.nan
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
                if diverged is not None:
                    # As scikit-learn: the diverged epoch scores NaN and the weights of the
                    # best validation score are kept (restored below).  scikit-learn goes
                    # on with non-finite weights to max_iter; here the step that diverged
                    # was refused, and training stops there.
                    self.validation_scores_.append(np.nan)
                    warnings.warn(f"{_DIVERGED} ({diverged}; epoch {self.n_iter_}.) Training "
                                  "stopped; the weights of the best validation score are kept.",
                                  ConvergenceWarning, stacklevel=4)
                    break
                self._update_no_improvement_count(validation)
                if self.solver == "sgd" and self.learning_rate == "invscaling":
                    self._set_lr(self.learning_rate_init / (self.t_ + 1) ** self.power_t)
                if self._no_improvement_count > self.n_iter_no_change:
                    if self._stop_or_slow_down():
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                                  "reached and the optimization hasn't converged yet.",
                                  ConvergenceWarning, stacklevel=4)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=4)
        finally:
            self.network_.eval()
        if self.early_stopping:
            self._restore(self._best_snapshot)

    def _targets(self, Y):
        """Y as the network's targets: the built-in cross-entropy takes class numbers
        (cheaper than one-hot rows)."""
        return Y.argmax(axis=1) if self.out_activation_ == "softmax" else Y

    def _train_batch(self, X, T, sample_weight, rows):
        """One step on X[rows] against targets T[rows]: the loss with its L2 penalty, the
        gradients, the update.  Returns the minibatch loss (before the update), as
        scikit-learn does; a refused step raises FloatingPointError and changes nothing."""
        net = self.network_
        norm = len(rows) if sample_weight is None else float(sample_weight[rows].sum())
        if norm == 0:                   # nothing to learn from in this minibatch
            return 0.0
        if hasattr(X, "toarray"):       # sparse: densify just this batch
            X, T = _rows(X, rows), T[rows]
            sample_weight = None if sample_weight is None else sample_weight[rows]
            rows = None
        if self.out_activation_ == "exp":       # forward, backward and step: one step
            with training.undone_if_refused(net):
                loss = self._poisson_gradients(X, T, sample_weight, rows, norm)
                net.step()
            net.zero_grad()
            return loss
        factor, scale, l2, penalty = self._built_in_terms(norm)
        # forward, loss, backward and update in one call into the core
        return penalty + factor * net._engine.train_step(
            X, T, net.optimizer, rows, 0.0, False, sample_weight, l2, scale)

    def _built_in_terms(self, norm):
        """scikit-learn's objective on rows of total weight `norm` from the core's built-in
        loss with its L2 penalty (l2/2 * sum ||W||^2, gradient l2 * W): returns (factor,
        scale, l2, penalty) such that the objective is ``penalty + factor * the core's
        loss`` and its gradient ``scale * the core's gradient`` (see _BUILT_IN)."""
        factor, scale = _loss_factors(self.out_activation_, self.n_outputs_)
        penalty = 0.0
        if factor != scale and self.alpha > 0:  # the penalty's share the core's loss lacks
            penalty = 0.5 * self.alpha / norm * (1 - factor / scale) * sum(
                float(w.ravel() @ w.ravel()) for w in self.coefs_)
        return factor, scale, self.alpha / (norm * scale), penalty

    # ---- solver='lbfgs'

    def _fit_lbfgs(self, X, Y, sample_weight):
        """scikit-learn's L-BFGS: SciPy's L-BFGS-B over the network's flat parameters,
        starting from the current ones, with maxiter=max_iter, maxfun=max_fun and
        gtol=tol; each evaluation is one pass over every row."""
        if hasattr(X, "toarray"):       # every evaluation reads every row: densify once
            X = X.toarray()
        net, T = self.network_, self._targets(Y)
        start = net.params.astype(np.float64)
        net.train()
        try:
            result = minimize(self._loss_grad, start, args=(X, T, sample_weight),
                              method="L-BFGS-B", jac=True,
                              options={"maxiter": self.max_iter, "maxfun": self.max_fun,
                                       "gtol": self.tol})
        finally:
            net.eval()
        if not (np.isfinite(result.x).all() and np.isfinite(result.fun)):
            # Where the loss overflows SciPy has nowhere to go (from the start, it may
            # even step to NaN weights): as with a refused minibatch step, the weights
            # stay finite, the start's.
            net.params[...] = start
            raise ValueError(f"{_DIVERGED} (L-BFGS reached weights where the loss is not "
                             "finite.)")
        net.params[...] = result.x      # the last evaluation may have been a trial point
        # scikit-learn's _check_optimize_result: scipy's count can pass maxiter
        self.n_iter_ = min(result.nit, self.max_iter)
        self.loss_ = float(result.fun)
        if result.status != 0:
            message = (f"lbfgs failed to converge after {self.n_iter_} iteration(s) "
                       f"(status={result.status}):\n{result.message}\n")
            if self.n_iter_ == self.max_iter:
                message += ("\nIncrease the number of iterations to improve the convergence "
                            f"(max_iter={self.max_iter}).")
            message += ("\nYou might also want to scale the data as shown in:\n"
                        "    https://scikit-learn.org/stable/modules/preprocessing.html")
            warnings.warn(message, ConvergenceWarning, stacklevel=4)

    def _loss_grad(self, theta, X, T, sample_weight):
        """scikit-learn's objective on all of (X, T) and its gradient (float64, for SciPy)
        at the parameters `theta`, flat in the network's order."""
        net = self.network_
        net.params[...] = theta
        net.zero_grad()
        norm = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        try:
            if self.out_activation_ == "exp":
                loss = self._poisson_gradients(X, T, sample_weight, None, norm)
            else:
                factor, scale, l2, penalty = self._built_in_terms(norm)
                loss = penalty + factor * net.compute_gradients(
                    X, T, sample_weight=sample_weight, l2=l2, scale=scale)
        except FloatingPointError:
            # Not finite here (SciPy's line search steps back from such a trial point; at
            # the start it stops, ABNORMAL).  A zero gradient would read as converged.
            return np.inf, np.full_like(theta, np.nan)
        return loss, net.grads.astype(np.float64)

    def _loss_grad_lbfgs(self, packed_coef_inter, X, y, sample_weight=None, *_scratch):
        """scikit-learn's private objective for L-BFGS, for code written against it (its
        test_gradient is): the loss and gradient on X and binarized targets y at the
        parameters packed as scikit-learn packs them (every ``coefs_`` raveled, then every
        ``intercepts_``).  Like scikit-learn's, it leaves those parameters in the model.
        scikit-learn's scratch lists (activations, deltas, gradients) are not needed."""
        layers = self._dense_layers(self.network_)
        weights = self.coefs_ + self.intercepts_
        grads = [layer.weight_grad.T for layer in layers] + [layer.bias_grad for layer in layers]
        bounds = np.cumsum([0] + [w.size for w in weights])
        for w, start, stop in zip(weights, bounds, bounds[1:]):
            w[...] = np.reshape(packed_coef_inter[start:stop], w.shape)
        dtype = self.network_.dtype
        Y = np.asarray(y).reshape(X.shape[0], -1).astype(dtype)
        sw = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        loss, _ = self._loss_grad(self.network_.params.copy(), np.asarray(X, dtype),
                                  self._targets(Y), sw)
        return loss, np.concatenate([g.ravel() for g in grads]).astype(np.float64)

    def _poisson_gradients(self, X, T, sample_weight, rows, norm):
        """The Poisson head's loss and gradients, computed here (see _BUILT_IN)."""
        net = self.network_
        rows = slice(None) if rows is None else rows
        z = net.forward(X[rows])
        y, sw = T[rows], None if sample_weight is None else sample_weight[rows]
        p, loss_rows = _poisson(z, y)
        loss = _mean(loss_rows, sw)
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss}")
        delta = p - y                   # dLoss/dz
        if sw is not None:
            delta *= sw[:, None].astype(delta.dtype)
        delta /= delta.dtype.type(norm)
        net.backward(grad_output=delta, input_grad=False)   # dL/dX is not needed
        penalty = 0.0
        for layer in self._dense_layers(net):
            w, grad = layer.weight.ravel(), layer.weight_grad.ravel()     # views
            penalty += float(w @ w)
            grad += w * w.dtype.type(self.alpha / norm)
        return loss + 0.5 * self.alpha * penalty / norm

    def _set_lr(self, lr):
        optimizer = self.network_.optimizer
        if isinstance(optimizer, SGD) and optimizer.steps and lr > 0:
            # scikit-learn's velocity holds past steps already multiplied by their learning
            # rate (v = momentum * v - lr * g); backprop's (PyTorch's) momentum buffer holds
            # raw gradients and multiplies by the current rate.  Rescaling the buffer when
            # the rate changes makes the next updates scikit-learn's exactly.  Loaded as a
            # state, so the optimizer measures it again (it bounds its updates from the
            # largest values it holds).
            state = optimizer.state_dict()
            state["state"]["momentum_buffer"] *= optimizer.lr / lr
            optimizer.load_state_dict(state)
        optimizer.lr = lr

    def _stop_or_slow_down(self):
        """After n_iter_no_change epochs without progress: stop, or with sgd's 'adaptive'
        rate divide it by 5 and go on (stop once it is at most 1e-6)."""
        what = ("Validation score" if self.early_stopping else "Training loss")
        msg = (f"{what} did not improve more than tol={self.tol:f} for "
               f"{self.n_iter_no_change} consecutive epochs.")
        lr = self.network_.optimizer.lr
        if self.solver == "sgd" and self.learning_rate == "adaptive" and lr > 1e-6:
            self._set_lr(lr / 5.0)
            if self.verbose:
                print(f"{msg} Setting learning rate to {lr / 5.0:f}")
            return False
        if self.verbose:
            print(msg + (" Learning rate too small." if self.learning_rate == "adaptive"
                         and self.solver == "sgd" else "") + " Stopping.")
        return True

    def _update_no_improvement_count(self, validation):
        if validation is not None:
            score = self._validation_score(*validation)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_snapshot = self._snapshot()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _split_validation(self, X, Y, sample_weight, rs):
        """Hold out validation_fraction of the rows (stratified for binary classifiers,
        as scikit-learn does) with the same draws from random_state."""
        # stratified on scikit-learn's boolean targets, so its error names a class 'True'
        stratify = (Y.astype(bool) if isinstance(self, ClassifierMixin) and Y.shape[1] == 1
                    else None)
        arrays = (X, Y) if sample_weight is None else (X, Y, sample_weight)
        parts = train_test_split(*arrays, random_state=rs, test_size=self.validation_fraction,
                                 stratify=stratify)
        X, X_val, Y, Y_val = parts[:4]
        sw, sw_val = (parts[4], parts[5]) if sample_weight is not None else (None, None)
        if X_val.shape[0] < 2:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' "
                             "or the size of your dataset.")
        return X, Y, sw, (X_val, Y_val, sw_val)

    def _validation_score(self, X, Y, sample_weight):
        self.network_.eval()
        try:
            p = self._forward(X)
        finally:
            self.network_.train()
        if not np.isfinite(p).all():
            return np.nan
        return self._score_outputs(p, Y, sample_weight)

    # ---- prediction

    def _forward(self, X):
        """Outputs p = f(z) of the network for validated X, in chunks of rows."""
        chunks = [self.network_.forward(_rows(X, slice(i, i + _PREDICT_CHUNK)))
                  for i in range(0, X.shape[0], _PREDICT_CHUNK)]
        outputs = np.concatenate(chunks)
        return _poisson(outputs)[0] if self.out_activation_ == "exp" else outputs

    def _predict_outputs(self, X):
        """Outputs for new X, in X's precision (float32 for float32 X, else float64) as
        scikit-learn returns them, whatever precision the network computes in."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr"], dtype=(np.float64, np.float32),
                          reset=False)
        out_dtype = X.dtype
        with _threads(self.n_threads):
            X = X.astype(self.network_.dtype, copy=False)
            return self._forward(X).astype(out_dtype, copy=False)

    def _validate_X_y(self, X, y, reset, y_numeric):
        """X in the precision training runs in, and y.  That precision is scikit-learn's
        rule, X's own (validation makes anything but float32 float64), unless ``dtype``
        forces one or ``precision='bfloat16'`` (which trains in float32); partial_fit and
        warm starts go on in the network's."""
        X, y = validate_data(self, X, y, accept_sparse=["csr"], multi_output=True,
                             y_numeric=y_numeric, dtype=(np.float64, np.float32), reset=reset)
        if not reset:
            X = X.astype(self.network_.dtype, copy=False)
        elif self.dtype is not None or self.precision == "bfloat16":
            X = X.astype(self.dtype or np.float32, copy=False)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    def __sklearn_is_fitted__(self):
        return "network_" in vars(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True       # CSR/CSC input is densified batch by batch
        return tags


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier, scikit-learn's ``MLPClassifier`` on backprop.

    Minimises the log-loss (softmax output for several classes, one logistic output for
    two classes, one logistic output per label for a multi-label indicator ``y``) plus
    ``alpha`` times the L2 penalty, with ``solver='adam'``, ``'sgd'`` or ``'lbfgs'``.

    Parameters
    ----------
    hidden_layer_sizes, activation, solver, alpha, batch_size, learning_rate,
    learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose, warm_start,
    momentum, nesterovs_momentum, early_stopping, validation_fraction, beta_1, beta_2,
    epsilon, n_iter_no_change, max_fun
        As in ``sklearn.neural_network.MLPClassifier`` (same defaults and meanings).
    dtype : {None, 'float32', 'float64'}, default=None
        Precision of the network and of training.  None is scikit-learn's rule: X's
        precision, float32 or float64 (any other input becomes float64).  A warm start
        or partial_fit goes on in the precision of the network it continues.
    precision : {'float32', 'bfloat16'}, default='float32'
        What the layers' products multiply: 'bfloat16' is mixed precision (operands
        rounded to bfloat16, sums and weights in float32; see ``backprop.Network``), and
        trains in float32.
    n_threads : int or None, default=None
        Threads for backprop's kernels during fit and predict (process-wide while they
        run); None leaves ``backprop.set_num_threads`` / ``OMP_NUM_THREADS`` in charge.
    batch_norm : bool, default=False
        Batch normalisation after each hidden Dense layer (before its activation).  It
        cannot normalise a minibatch of one row: a last minibatch of one row joins the
        one before it.  Not with ``solver='lbfgs'``.
    dropout : float in [0, 1), default=0.0
        Dropout probability after each hidden layer's activation (training only).  Not
        with ``solver='lbfgs'``, which needs the same objective at every evaluation.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,), when X has string column names
    n_iter_, t_, loss_, loss_curve_, best_loss_, validation_scores_, best_validation_score_,
    n_layers_, n_outputs_, out_activation_ : as scikit-learn's (with solver='lbfgs',
        as there, no loss_curve_, best_loss_ or validation scores)
    coefs_ : list of ndarray of shape (n_in, n_out)
        Views of the network's weights (``network_.layers[i].weight.T``).  Set before the
        first fit, as in scikit-learn, they are the starting weights of a partial_fit or
        a warm-started fit (with ``intercepts_`` likewise).
    intercepts_ : list of ndarray of shape (n_out,)
    network_ : backprop.Network
        The trained network; its last layer is linear (it outputs the logits).
    """

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y), continuing from the current weights and optimizer state.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
        sample_weight : array-like of shape (n_samples,), optional
        classes : array-like of shape (n_classes,)
            Every class of the whole data set; required on the first call (except for a
            multi-label indicator y), optional after it.

        Returns
        -------
        self
        """
        if not hasattr(self, "classes_"):
            if classes is None and type_of_target(y) != "multilabel-indicator":
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self._fit_classes = classes
        elif classes is not None and not np.array_equal(self.classes_, np.unique(classes)):
            raise ValueError(f"`classes={classes!r}` is not the same as on the last call to "
                             f"partial_fit, was: {self.classes_!r}")
        try:
            return self._fit(X, y, sample_weight, incremental=True)
        finally:
            self.__dict__.pop("_fit_classes", None)

    def _output_activation(self):
        return "softmax" if self._label_kind == "multiclass" else "logistic"

    def _validate_input(self, X, y, incremental, reset):
        X, y = self._validate_X_y(X, y, reset, y_numeric=False)
        first = not hasattr(self, "classes_") or (not self.warm_start and not incremental)
        if first:
            labels = getattr(self, "_fit_classes", None)
            self._set_classes(y if labels is None else np.asarray(labels), y)
        seen = np.arange(y.shape[1]) if y.ndim == 2 else np.unique(y)
        if not first and self.warm_start and not incremental and set(seen) != set(self.classes_):
            raise ValueError("warm_start can only be used where `y` has the same classes "
                             f"as in the previous call to fit. Previously got "
                             f"{self.classes_}, `y` has {seen}")
        if len(np.setdiff1d(seen, self.classes_)):     # partial_fit's first call included
            raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                             f"{self.classes_}. 'y' has {seen}.")
        return X, self._binarize(y, X.dtype)

    def _set_classes(self, labels, y):
        """classes_ and the kind of problem, from the labels (``y`` or ``classes=``)."""
        kind = type_of_target(y)
        if kind not in ("binary", "multiclass", "multilabel-indicator"):
            raise ValueError(f"Unknown label type: {kind!r}.  {type(self).__name__} needs class "
                             "labels (binary or multiclass) or a 0/1 indicator matrix "
                             "(multi-label); use MLPRegressor for continuous targets")
        if kind == "multilabel-indicator":
            self.classes_, self._label_kind = np.arange(y.shape[1]), "multilabel"
        else:
            self.classes_ = np.unique(labels)
            self._label_kind = "multiclass" if len(self.classes_) > 2 else "binary"

    def _binarize(self, y, dtype):
        """Targets as the network's output rows in `dtype` (scikit-learn's LabelBinarizer)."""
        if self._label_kind == "multilabel":
            if y.ndim != 2 or y.shape[1] != len(self.classes_):
                raise ValueError(f"y must be an indicator matrix with {len(self.classes_)} "
                                 f"columns, got shape {y.shape}")
            return y.astype(dtype)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D class labels, got shape {y.shape}")
        if self._label_kind == "binary":      # one logistic output: P(classes_[1])
            positive = self.classes_[1] if len(self.classes_) == 2 else None
            return (y == positive).astype(dtype)[:, None]
        return (y[:, None] == self.classes_).astype(dtype)

    def _decode(self, p):
        """Labels from output rows p (probabilities or binarized targets)."""
        if self._label_kind == "multilabel":
            return (p > 0.5).astype(np.int64)
        if self._label_kind == "binary":
            return self.classes_[(p[:, 0] > 0.5).astype(np.intp) if len(self.classes_) == 2
                                 else np.zeros(len(p), np.intp)]
        return self.classes_[p.argmax(axis=1)]

    def _score_outputs(self, p, Y, sample_weight):
        return _accuracy(self._decode(Y), self._decode(p), sample_weight)

    def predict(self, X):
        """Class labels, shape (n_samples,) (or (n_samples, n_labels) 0/1 for multi-label)."""
        return self._decode(self._predict_outputs(X))

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes), columns in ``classes_`` order
        (two columns for a binary problem, from its one logistic output)."""
        p = self._predict_outputs(X)
        if self._label_kind == "binary":
            return np.hstack([1 - p, p])
        return p

    def predict_log_proba(self, X):
        """log(predict_proba(X)), shape (n_samples, n_classes)."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba, out=proba)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor, scikit-learn's ``MLPRegressor`` on backprop.

    Minimises half the squared error (linear output, any number of outputs) or, with
    ``loss='poisson'``, half the Poisson deviance (exponential output, y >= 0), plus
    ``alpha`` times the L2 penalty, with ``solver='adam'``, ``'sgd'`` or ``'lbfgs'``.

    Parameters
    ----------
    loss : {'squared_error', 'poisson'}, default='squared_error'
    hidden_layer_sizes, activation, ...
        As in ``sklearn.neural_network.MLPRegressor``, and the extras of
        ``MLPClassifier`` (``dtype``, ``n_threads``, ``batch_norm``, ``dropout``).

    Attributes
    ----------
    As ``MLPClassifier`` without ``classes_``; ``predict`` returns shape (n_samples,) for
    one output and (n_samples, n_outputs) for several.
    """

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype=None, precision="float32", n_threads=None, batch_norm=False,
                 dropout=0.0):
        self.loss = loss
        super().__init__(
            hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver,
            alpha=alpha, batch_size=batch_size, learning_rate=learning_rate,
            learning_rate_init=learning_rate_init, power_t=power_t, max_iter=max_iter,
            shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
            warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change,
            max_fun=max_fun, dtype=dtype, precision=precision, n_threads=n_threads,
            batch_norm=batch_norm, dropout=dropout)

    def _check_params(self):
        _check_choice(type(self).__name__, "loss", self.loss, {"squared_error", "poisson"})
        super()._check_params()

    @available_if(_stochastic_solver)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the current weights and optimizer state.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def _output_activation(self):
        return "exp" if self.loss == "poisson" else "identity"

    def _validate_input(self, X, y, incremental, reset):
        X, y = self._validate_X_y(X, y, reset, y_numeric=True)
        if self.loss == "poisson" and (y < 0).any():
            raise ValueError("Some value(s) of y are negative which is not allowed for "
                             "loss='poisson'.")
        return X, y.reshape(len(y), -1).astype(X.dtype)

    def _score_outputs(self, p, Y, sample_weight):
        return _r2(Y.astype(np.float64), p, sample_weight)

    def predict(self, X):
        """Predicted targets, shape (n_samples,) or (n_samples, n_outputs)."""
        p = self._predict_outputs(X)
        return p.ravel() if p.shape[1] == 1 else p

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
