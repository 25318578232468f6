"""MLPClassifier / MLPRegressor on their own (no scikit-learn needed): scikit-learn's
parameters, losses, gradients, stopping rules and fitted attributes.

The comparisons with scikit-learn itself (its estimator checks, identical training in
float64, clone/Pipeline/GridSearchCV) are in test_estimators_sklearn.py.
"""
import copy as copy_module
import importlib.util
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import backprop as bp
from backprop import datasets
from backprop.estimators import (ConvergenceWarning, MLPClassifier, MLPRegressor,
                                 NotFittedError)


# Runs that stop at max_iter on purpose warn as scikit-learn does; the warning is tested once.
pytestmark = pytest.mark.filterwarnings("ignore:Stochastic Optimizer")

HAVE_SCIPY = importlib.util.find_spec("scipy") is not None
needs_scipy = pytest.mark.skipif(not HAVE_SCIPY, reason="solver='lbfgs' needs SciPy, "
                                 "not installed (test_lbfgs_without_scipy_is_refused runs)")



def _blobs(n=120, n_classes=3, n_features=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(n_classes, n_features))
    y = np.arange(n) % n_classes
    return centers[y] + rng.normal(size=(n, n_features)), y


# --------------------------------------------------------------------------- learning

def test_classifier_learns_digits_with_arbitrary_labels():
    X, y = datasets.load_digits()
    names = np.array(list("abcdefghij"))[y]                 # labels need not be 0..k-1
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, names, seed=0, stratify=True)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=150, random_state=0)
    clf.fit(X_train, y_train)
    assert list(clf.classes_) == list("abcdefghij")
    assert clf.predict(X_test).dtype == names.dtype
    assert clf.score(X_test, y_test) > 0.95
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X_test))
    np.testing.assert_allclose(clf.predict_log_proba(X_test), np.log(proba), rtol=1e-5)


def test_regressor_fits_a_smooth_function():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(512, 2))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1]
    reg = MLPRegressor(hidden_layer_sizes=(32, 32), activation="tanh", max_iter=300,
                       learning_rate_init=3e-3, random_state=0).fit(X, y)
    assert reg.predict(X).shape == (512,)
    assert reg.score(X, y) > 0.95
    assert reg.out_activation_ == "identity" and reg.n_outputs_ == 1 and reg.n_layers_ == 4


def test_multi_output_regression_and_poisson():
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, size=(400, 3))
    Y = np.stack([X.sum(axis=1), X[:, 0] * X[:, 1]], axis=1)
    reg = MLPRegressor(hidden_layer_sizes=(32,), max_iter=400, learning_rate_init=1e-2,
                       random_state=0).fit(X, Y)
    assert reg.predict(X).shape == (400, 2) and reg.n_outputs_ == 2
    assert reg.score(X, Y) > 0.9
    counts = rng.poisson(np.exp(X[:, 0]))                 # log-linear counts
    poisson = MLPRegressor(loss="poisson", hidden_layer_sizes=(16,), max_iter=200,
                           learning_rate_init=1e-2, random_state=0).fit(X, counts)
    assert poisson.out_activation_ == "exp" and (poisson.predict(X) > 0).all()
    with pytest.raises(ValueError, match="negative"):
        MLPRegressor(loss="poisson").fit(X, -counts - 1)


def test_binary_problem_has_one_logistic_output_and_two_probability_columns():
    X, y = _blobs(n_classes=2)
    labels = np.where(y == 1, "yes", "no")
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=300, learning_rate_init=0.01,
                        random_state=0).fit(X, labels)
    assert clf.out_activation_ == "logistic" and clf.n_outputs_ == 1
    assert clf.coefs_[-1].shape == (8, 1)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    # column 1 is P(classes_[1]); predict thresholds it at 0.5
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[(proba[:, 1] > 0.5).astype(int)])
    assert clf.score(X, labels) > 0.95


def test_multilabel_indicator_targets():
    X, y = _blobs(n=200, n_classes=4)
    Y = np.stack([y % 2, y >= 2, y == 3], axis=1).astype(int)    # 3 labels per row
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(X, Y)
    assert clf.out_activation_ == "logistic" and clf.n_outputs_ == 3
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    pred = clf.predict(X)
    assert pred.shape == Y.shape and set(np.unique(pred)) <= {0, 1}
    np.testing.assert_array_equal(pred, (clf.predict_proba(X) > 0.5).astype(int))
    assert clf.score(X, Y) > 0.9                             # subset accuracy


# --------------------------------------------------------------------------- the maths
# An independent NumPy forward pass and scikit-learn's loss definitions, written out.

def _hand_forward(X, coefs, intercepts, hidden, out):
    a = X
    for i, (W, b) in enumerate(zip(coefs, intercepts)):
        z = a @ W + b
        if i < len(coefs) - 1:
            a = {"relu": np.maximum(z, 0), "tanh": np.tanh(z), "identity": z,
                 "logistic": 1 / (1 + np.exp(-z))}[hidden]
    return {"identity": z, "exp": np.exp(z), "logistic": 1 / (1 + np.exp(-z)),
            "softmax": np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)}[out]


def _hand_loss(X, Y, sw, coefs, intercepts, hidden, out, alpha, output_mean=True):
    """scikit-learn's objective for one batch: the (weighted) mean loss plus
    alpha / (2 * sum of weights) * sum of squared weights (intercepts excluded).

    Its squared error is averaged over the outputs in the reported loss, but its
    gradient is that of the sum over outputs (delta = p - y): output_mean=False gives
    the objective whose gradient scikit-learn (and backprop) follow."""
    p = _hand_forward(X, coefs, intercepts, hidden, out)
    reduce = np.mean if output_mean else np.sum
    per_row = {"identity": lambda: 0.5 * reduce((p - Y) ** 2, axis=1),
               "softmax": lambda: -(Y * np.log(p)).sum(axis=1),
               "logistic": lambda: -(Y * np.log(p) + (1 - Y) * np.log(1 - p)).sum(axis=1),
               "exp": lambda: (np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1) / p), 0)
                               - Y + p).sum(axis=1)}[out]()
    w = np.ones(len(X)) if sw is None else sw
    return per_row @ w / w.sum() + alpha / (2 * w.sum()) * sum((W ** 2).sum() for W in coefs)


CASES = {   # name: (estimator, targets from the blob labels y, binarized targets for the loss)
    "multiclass": (MLPClassifier, lambda y: y, lambda y: np.eye(3)[y]),
    "binary": (MLPClassifier, lambda y: y % 2, lambda y: (y % 2)[:, None]),
    "multilabel": (MLPClassifier, lambda y: np.stack([y % 2, y == 2], 1),
                   lambda y: np.stack([y % 2, y == 2], 1)),
    "regression": (MLPRegressor, lambda y: np.stack([y * 0.5, np.cos(y)], 1),
                   lambda y: np.stack([y * 0.5, np.cos(y)], 1)),
    "poisson": (MLPRegressor, lambda y: y, lambda y: y[:, None].astype(float)),
}


def _numeric_gradient(objective, params, h=1e-6):
    """Central differences of objective(list of arrays) at `params`, array by array."""
    grads = []
    for k, array in enumerate(params):
        grad = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            plus, minus = [w.copy() for w in params], [w.copy() for w in params]
            plus[k][idx] += h
            minus[k][idx] -= h
            grad[idx] = (objective(plus) - objective(minus)) / (2 * h)
        grads.append(grad)
    return grads


def _case(case, weighted):
    """The data, sample weights, estimator class and first partial_fit arguments of CASES."""
    cls, target, binarized = CASES[case]
    X, y = _blobs(n=30, n_features=3)
    sw = np.random.default_rng(2).integers(0, 4, size=len(X)).astype(float) if weighted else None
    extra = {"loss": "poisson"} if case == "poisson" else {}
    first = dict(classes=np.unique(target(y))) if cls is MLPClassifier and case != "multilabel" else {}
    return X, target(y), binarized(y), sw, cls, extra, first


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradient_are_scikit_learns(case, weighted):
    """One plain SGD step (momentum 0, one full batch) moves the parameters by
    -lr * gradient, and reports the loss before the step: both are checked against the
    objective written out above, its gradient by central differences."""
    X, y, Y, sw, cls, extra, first = _case(case, weighted)
    lr, alpha, hidden = 0.1, 0.3, "tanh"
    est = cls(hidden_layer_sizes=(4,), activation=hidden, solver="sgd", momentum=0.0,
              learning_rate_init=lr, alpha=alpha, batch_size=len(X), shuffle=False,
              dtype="float64", random_state=0, **extra)
    est.partial_fit(X, y, **first)                   # weights W0 (after one step)
    W0 = [c.copy() for c in est.coefs_] + [b.copy() for b in est.intercepts_]
    est.partial_fit(X, y, sample_weight=sw)          # one more step, from W0
    W1 = est.coefs_ + est.intercepts_
    n_layers = len(est.coefs_)

    def objective(params, output_mean=False):
        return _hand_loss(X, Y, sw, params[:n_layers], params[n_layers:], hidden,
                          est.out_activation_, alpha, output_mean)

    assert est.loss_ == pytest.approx(objective(W0, output_mean=True), rel=1e-12)
    for before, after, numeric in zip(W0, W1, _numeric_gradient(objective, W0)):
        np.testing.assert_allclose((before - after) / lr, numeric, rtol=1e-6, atol=1e-8)


@needs_scipy
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", list(CASES))
def test_lbfgs_stops_where_scikit_learns_objective_is_flat(case, weighted):
    """L-BFGS minimises the whole data set's objective: where it stops, the gradient of
    the objective written out above (by central differences, ~1e-9 accurate here) is
    flat to within scikit-learn's tol, up to what SciPy's relative-decrease stop leaves.
    An objective off by the penalty (alpha / n * W, ~1e-2 here) or by the outputs' scale
    would leave a gradient of that size.  loss_ is the objective there."""
    X, y, Y, sw, cls, extra, _ = _case(case, weighted)
    if case == "regression":
        # scikit-learn's squared-error loss is the mean over the outputs, its gradient that
        # of their sum (see _BUILT_IN): with several outputs L-BFGS is given a loss and a
        # gradient that do not match, and its line search stops early, in scikit-learn
        # as here (test_float64_lbfgs_is_scikit_learns).  One output here.
        y, Y = y[:, 0], Y[:, :1]
    alpha, hidden, tol = 0.3, "tanh", 1e-6
    est = cls(hidden_layer_sizes=(4,), activation=hidden, solver="lbfgs", alpha=alpha,
              tol=tol, max_iter=5000, random_state=0, **extra)
    est.fit(X, y, sample_weight=sw)
    assert est.network_.dtype == np.float64                  # X's precision
    assert 0 < est.n_iter_ < 5000 and est.t_ == 0
    for name in ("loss_curve_", "best_loss_", "validation_scores_"):    # as scikit-learn's
        assert not hasattr(est, name), name
    W = [c.copy() for c in est.coefs_] + [b.copy() for b in est.intercepts_]
    n_layers = len(est.coefs_)

    def objective(params, output_mean=False):
        return _hand_loss(X, Y, sw, params[:n_layers], params[n_layers:], hidden,
                          est.out_activation_, alpha, output_mean)

    assert est.loss_ == pytest.approx(objective(W, output_mean=True), rel=1e-12)
    flat = max(abs(g).max() for g in _numeric_gradient(objective, W))
    assert flat < 1e-4, flat


@needs_scipy
def test_lbfgs_limits_warnings_and_warm_start(monkeypatch):
    X, y = _blobs()
    kw = dict(solver="lbfgs", hidden_layer_sizes=(8,), random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"(?s)lbfgs failed to converge after 3 "
                                                r"iteration\(s\).*max_iter=3"):
        short = MLPClassifier(max_iter=3, **kw).fit(X, y)
    assert short.n_iter_ == 3
    # max_fun bounds the evaluations of loss and gradient (SciPy's maxfun): SciPy stops
    # at the end of the iteration in which the count passes it, whose line search takes
    # at most maxls = 20 evaluations
    calls = []
    evaluate = MLPClassifier._loss_grad
    monkeypatch.setattr(MLPClassifier, "_loss_grad",
                        lambda self, *args: calls.append(1) or evaluate(self, *args))
    with pytest.warns(ConvergenceWarning, match="F,G EVALUATIONS EXCEEDS LIMIT"):
        few = MLPClassifier(max_fun=7, **kw).fit(X, y)
    assert 7 < len(calls) <= 7 + 20 and few.n_iter_ <= 7
    monkeypatch.undo()
    # a warm start goes on from the weights reached; a cold fit starts again
    warm = MLPClassifier(max_iter=3, warm_start=True, **kw)
    with pytest.warns(ConvergenceWarning):
        first = warm.fit(X, y).loss_
        assert first == short.loss_
        assert warm.fit(X, y).loss_ < first
    # float32 data trains in float32
    narrow = MLPClassifier(max_iter=200, **kw).fit(X.astype(np.float32), y)
    assert narrow.network_.dtype == np.float32
    assert all(w.dtype == np.float32 for w in narrow.coefs_ + narrow.intercepts_)
    assert narrow.score(X, y) > 0.95


@pytest.mark.parametrize("name, value", [("dropout", 0.2), ("batch_norm", True)])
def test_lbfgs_refuses_what_changes_its_objective_between_evaluations(name, value):
    clf = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(4,), **{name: value})
    with pytest.raises(ValueError, match=f"lbfgs.*{name}"):
        clf.fit(*_blobs())
    assert not any(k.endswith("_") for k in vars(clf))


def test_partial_fit_is_there_for_the_minibatch_solvers_only():
    # As in scikit-learn: hasattr is False with solver='lbfgs'.
    for cls in (MLPClassifier, MLPRegressor):
        assert hasattr(cls(), "partial_fit") and hasattr(cls(solver="sgd"), "partial_fit")
        est = cls(solver="lbfgs")
        assert not hasattr(est, "partial_fit")
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as error:
            est.partial_fit(*_blobs())
        assert "lbfgs is not stochastic" in str(error.value.__cause__)
        assert hasattr(est.set_params(solver="adam"), "partial_fit")


def test_coefs_are_views_in_scikit_learns_orientation():
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(5, 6), activation="logistic", max_iter=50,
                        random_state=0).fit(X, y)
    assert [c.shape for c in clf.coefs_] == [(4, 5), (5, 6), (6, 3)]
    assert [b.shape for b in clf.intercepts_] == [(5,), (6,), (3,)]
    expected = _hand_forward(X, [c.astype(float) for c in clf.coefs_], clf.intercepts_,
                             "logistic", "softmax")
    np.testing.assert_allclose(clf.predict_proba(X), expected, rtol=1e-4, atol=1e-6)
    clf.coefs_[-1][...] = 0                      # the views write through to the network
    clf.intercepts_[-1][...] = [0, 5, 0]
    assert (clf.predict(X) == 1).all()
    clf.coefs_ = [np.zeros((4, 5)), np.zeros((5, 6)), np.zeros((6, 3))]   # the setter copies in
    assert not clf.network_.layers[0].weight.any()
    with pytest.raises(ValueError, match="coefs_ must be 3 arrays"):
        clf.coefs_ = [np.zeros((5, 4))]


def test_initialisation_is_scikit_learns_glorot_uniform():
    # Weights and intercepts of layer (fan_in, fan_out) come from uniform(-b, b) with
    # b = sqrt(6 / (fan_in + fan_out)) (factor 2 for 'logistic'), drawn from
    # RandomState(random_state) layer by layer, weights (fan_in, fan_out) then intercepts.
    X, y = _blobs()
    for activation, factor in (("relu", 6.0), ("logistic", 2.0)):
        clf = MLPClassifier(hidden_layer_sizes=(7,), activation=activation, max_iter=1,
                            learning_rate_init=1e-300, dtype="float64", random_state=3)
        clf.fit(X, y)                        # one step of size 1e-300: nothing moves
        rs = np.random.RandomState(3)
        for (fan_in, fan_out), W, b in zip([(4, 7), (7, 3)], clf.coefs_, clf.intercepts_):
            bound = np.sqrt(factor / (fan_in + fan_out))
            np.testing.assert_array_equal(W, rs.uniform(-bound, bound, (fan_in, fan_out)))
            np.testing.assert_array_equal(b, rs.uniform(-bound, bound, fan_out))


# --------------------------------------------------------------------------- training rules

def test_partial_fit_keeps_the_adam_state():
    """Two partial_fit calls are two epochs of one fit: same weights, bit for bit (a reset
    of Adam's moments in between would change them)."""
    X, y = _blobs()
    kw = dict(hidden_layer_sizes=(8,), batch_size=16, shuffle=False, random_state=0)
    fitted = MLPClassifier(max_iter=2, **kw)
    fitted.fit(X, y)
    online = MLPClassifier(**kw).partial_fit(X, y, classes=[0, 1, 2]).partial_fit(X, y)
    for a, b in zip(fitted.coefs_ + fitted.intercepts_, online.coefs_ + online.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert online.network_.optimizer.steps == 2 * 8       # 120 rows / 16 = 8 steps per epoch
    assert online.t_ == fitted.t_ == 240 and online.loss_curve_ == fitted.loss_curve_
    with pytest.raises(ValueError, match="classes not in"):
        online.partial_fit(X, y + 5)
    with pytest.raises(ValueError, match="classes must be passed"):
        MLPClassifier().partial_fit(X, y)
    with pytest.raises(ValueError, match="early_stopping"):
        MLPRegressor(early_stopping=True).partial_fit(X, y)


def test_partial_fit_checks_y_against_classes_on_the_first_call_too():
    X, y = _blobs()                                  # labels 0, 1, 2
    for classes in ([2], [0, 1]):                    # y has labels classes lacks
        clf = MLPClassifier(hidden_layer_sizes=(4,))
        with pytest.raises(ValueError, match=r"`y` has classes not in `self.classes_`"):
            clf.partial_fit(X, y, classes=classes)
        assert not any(k.endswith("_") for k in vars(clf))       # nothing was set
    clf = MLPClassifier(hidden_layer_sizes=(4,), random_state=0)
    clf.partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])     # a subset of them is fine
    assert list(clf.classes_) == [0, 1, 2] and clf.n_outputs_ == 3
    weights = clf.network_.params.copy()
    with pytest.raises(ValueError, match="classes not in"):
        clf.partial_fit(X, y + 3)
    np.testing.assert_array_equal(clf.network_.params, weights)


def test_coefs_set_before_the_first_partial_fit_are_its_starting_weights():
    # scikit-learn's behaviour (its test_fit relies on it): coefs_ and intercepts_ set on
    # an unfitted estimator are where a partial_fit, or a warm-started fit, starts; a
    # cold fit draws its own.  Checked as one plain SGD step from them (see above).
    X, y, Y, _, _, _, first = _case("multiclass", weighted=False)
    rng = np.random.default_rng(5)
    W0 = [rng.normal(size=(3, 4)), rng.normal(size=(4, 3)), rng.normal(size=4),
          rng.normal(size=3)]
    lr, alpha = 0.1, 0.3
    kw = dict(hidden_layer_sizes=(4,), activation="tanh", solver="sgd", momentum=0.0,
              learning_rate_init=lr, alpha=alpha, batch_size=len(X), shuffle=False,
              random_state=0)
    est = MLPClassifier(**kw)
    est.coefs_ = [None, None]            # filled in place, as scikit-learn's test does
    est.coefs_[0], est.coefs_[1] = W0[0], W0[1]
    est.intercepts_ = W0[2:]
    est.partial_fit(X, y, **first)

    def objective(params):
        return _hand_loss(X, Y, None, params[:2], params[2:], "tanh", "softmax", alpha,
                          output_mean=False)

    for before, after, numeric in zip(W0, est.coefs_ + est.intercepts_,
                                      _numeric_gradient(objective, W0)):
        np.testing.assert_allclose((before - after) / lr, numeric, rtol=1e-6, atol=1e-8)
    cold = MLPClassifier(max_iter=2, **kw)
    cold.coefs_, cold.intercepts_ = W0[:2], W0[2:]
    cold.fit(X, y)
    for a, b in zip(cold.coefs_, MLPClassifier(max_iter=2, **kw).fit(X, y).coefs_):
        np.testing.assert_array_equal(a, b)
    bad = MLPClassifier(**kw)
    bad.coefs_ = [np.zeros((2, 2))]                  # checked when the fit starts
    with pytest.raises(ValueError, match=r"coefs_ must be 2 arrays of shapes \[\(3, 4\), "):
        bad.partial_fit(X, y, **first)
    assert "network_" not in vars(bad) and len(bad.coefs_) == 1     # nothing changed


def test_warm_start_continues_and_cold_start_restarts():
    X, y = _blobs()
    kw = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    clf = MLPClassifier(warm_start=True, **kw).fit(X, y)
    first = clf.loss_curve_[-1]
    clf.fit(X, y)
    assert len(clf.loss_curve_) == 10 and clf.n_iter_ == 5 and clf.t_ == 10 * len(X)
    assert clf.loss_curve_[5] < first                 # it went on from the trained weights
    assert clf.network_.optimizer.steps == 5          # a fresh optimizer for each fit
    cold = MLPClassifier(**kw).fit(X, y)
    assert cold.fit(X, y).loss_curve_ == MLPClassifier(**kw).fit(X, y).loss_curve_
    with pytest.raises(ValueError, match="same layer sizes"):
        clf.set_params(hidden_layer_sizes=(9,)).fit(X, y)


def test_tol_and_n_iter_no_change_stop_training():
    # With tol larger than any loss, epoch 1 sets best_loss_ and every later epoch counts
    # as no improvement; training stops once the count exceeds n_iter_no_change, i.e.
    # after epoch n_iter_no_change + 2.
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(8,), tol=1e9, n_iter_no_change=3, max_iter=100,
                        random_state=0).fit(X, y)
    assert clf.n_iter_ == 5 and len(clf.loss_curve_) == 5
    assert clf.best_loss_ == min(clf.loss_curve_)
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None


def test_adaptive_learning_rate_divides_by_five_then_stops():
    # As above, the first slowdown comes after epoch n + 2 (n = n_iter_no_change = 2);
    # each slowdown divides the rate by 5 and restarts the count, so the next one comes
    # n + 1 epochs later.  From 1e-3 the rate goes 2e-4, 4e-5, 8e-6, 1.6e-6, 3.2e-7; the
    # sixth time the rate is <= 1e-6 and training stops: epoch 4 + 5 * 3 = 19.
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(8,), solver="sgd", learning_rate="adaptive",
                        learning_rate_init=1e-3, tol=1e9, n_iter_no_change=2, max_iter=100,
                        random_state=0).fit(X, y)
    assert clf.n_iter_ == 19
    assert clf.network_.optimizer.lr == pytest.approx(1e-3 / 5 ** 5)


def test_invscaling_learning_rate():
    X, y = _blobs()
    clf = MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate="invscaling",
                       learning_rate_init=0.05, power_t=0.25, max_iter=3, random_state=0)
    clf.fit(X, y)
    # lr = learning_rate_init / (t + 1) ** power_t after each epoch, t = samples seen
    assert clf.t_ == 360
    assert clf.network_.optimizer.lr == pytest.approx(0.05 / 361 ** 0.25)


def test_early_stopping_keeps_the_best_validation_score():
    X, y = _blobs(n=300)
    clf = MLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, n_iter_no_change=4,
                        max_iter=200, random_state=0).fit(X, y)
    assert clf.best_loss_ is None
    assert len(clf.validation_scores_) == clf.n_iter_ == len(clf.loss_curve_)
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert clf.n_iter_ < 200
    # the validation rows are the first 10% (ceil(0.1 * 300) = 30) of the permutation
    # drawn after the weights (binary problems are stratified with scikit-learn instead)
    with pytest.raises(ValueError, match="validation set is too small"):
        MLPClassifier(early_stopping=True, validation_fraction=0.01).fit(X[:20], y[:20])


def test_verbose_and_convergence_warning(capsys):
    X, y = _blobs()
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(2\) reached"):
        MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, verbose=True, random_state=0).fit(X, y)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Iteration 1, loss = ") and out[1].startswith("Iteration 2, loss = ")


def test_sample_weights_equal_repeated_rows():
    # With one full batch per epoch, weights w are the same objective as repeating each
    # row w times (zero: dropping it); in float64 the fits agree to rounding.
    X, y = _blobs(n=30)
    w = np.random.default_rng(0).integers(0, 3, size=30)
    kw = dict(hidden_layer_sizes=(5,), max_iter=30, dtype="float64",     # one batch: "auto"
              random_state=0)
    weighted = MLPClassifier(**kw).fit(X, y, sample_weight=w)
    repeated = MLPClassifier(**kw).fit(np.repeat(X, w, axis=0), np.repeat(y, w))
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), rtol=1e-9)
    for bad, match in ((np.ones(5), "shape"), (-np.ones(30), "non-negative"),
                       (np.zeros(30), "non-zero")):
        with pytest.raises(ValueError, match=match):
            MLPClassifier().fit(X, y, sample_weight=bad)


def test_dtype_follows_X_unless_forced_and_threads():
    X, y = _blobs()
    kw = dict(hidden_layer_sizes=(16,), max_iter=20, random_state=0)
    # scikit-learn's rule: X's precision, float32 or float64; anything else float64
    for data, dtype in ((X, np.float64), (X.astype(np.float32), np.float32),
                        (X.round().astype(np.int64), np.float64)):
        clf = MLPClassifier(**kw).fit(data, y)
        assert clf.network_.dtype == dtype
        assert all(w.dtype == dtype for w in clf.coefs_ + clf.intercepts_)
    one = MLPClassifier(n_threads=1, dtype="float32", **kw).fit(X, y)     # forced
    two = MLPClassifier(n_threads=2, dtype="float32", **kw).fit(X, y)
    wide = MLPClassifier(**kw).fit(X, y)
    assert one.network_.dtype == np.float32 and wide.network_.dtype == np.float64
    for a, b in zip(one.coefs_, two.coefs_):                # bit-identical for any threads
        np.testing.assert_array_equal(a, b)
    assert one.predict_proba(X).dtype == np.float64          # outputs follow X's precision
    assert one.predict_proba(X.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(one.predict_proba(X), wide.predict_proba(X), atol=1e-4)
    # partial_fit and warm starts go on in the precision of the network they continue
    online = MLPClassifier(**kw).partial_fit(X.astype(np.float32), y, classes=[0, 1, 2])
    online.partial_fit(X, y)
    assert online.network_.dtype == np.float32 and online.coefs_[0].dtype == np.float32
    warm = MLPClassifier(warm_start=True, **kw).fit(X.astype(np.float32), y).fit(X, y)
    assert warm.network_.dtype == np.float32


def test_threads_setting_is_restored():
    before = bp.get_num_threads()
    X, y = _blobs()
    MLPRegressor(hidden_layer_sizes=(4,), max_iter=1, n_threads=1).fit(X, y)
    assert bp.get_num_threads() == before


# --------------------------------------------------------------------------- refusals

BAD_PARAMS = [
    ("hidden_layer_sizes", (10, 0), ValueError), ("hidden_layer_sizes", "10", TypeError),
    ("activation", "softmax", ValueError), ("solver", "rmsprop", ValueError),
    ("alpha", -1.0, ValueError), ("batch_size", 0, ValueError), ("batch_size", "all", TypeError),
    ("learning_rate", "cosine", ValueError), ("learning_rate_init", 0.0, ValueError),
    ("power_t", -0.5, ValueError), ("max_iter", 0, ValueError), ("max_iter", 2.5, TypeError),
    ("tol", -1e-4, ValueError), ("momentum", 1.5, ValueError),
    ("validation_fraction", 1.0, ValueError), ("beta_1", 1.0, ValueError),
    ("beta_2", -0.1, ValueError), ("epsilon", 0.0, ValueError),
    ("n_iter_no_change", 0, ValueError), ("max_fun", 0, ValueError),
    ("dtype", "float16", ValueError), ("n_threads", 0, ValueError),
    ("dropout", 1.0, ValueError), ("shuffle", "yes", TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_PARAMS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_PARAMS])
def test_bad_parameters_are_named_and_change_nothing(name, value, error):
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0)
    clf.fit(X, y)
    before = {k: v for k, v in vars(clf).items()}
    weights = clf.network_.params.copy()
    clf.set_params(**{name: value})
    with pytest.raises(error, match=name):
        clf.fit(X, y)
    assert vars(clf).keys() == before.keys() and clf.network_ is before["network_"]
    np.testing.assert_array_equal(clf.network_.params, weights)


def test_bad_input_is_refused_and_changes_nothing():
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0)
    with pytest.raises(NotFittedError):
        clf.predict(X)
    clf.fit(X, y)
    state = dict(vars(clf))
    bad_X = X.copy()
    bad_X[3, 1] = np.nan
    for args, match in (((bad_X, y), "NaN"), ((X[0], y), "2D"), ((X, y[:-1]), "samples"),
                        ((X, y + 0.5), "Unknown label type"), ((np.zeros((0, 4)), []), "0 sample")):
        with pytest.raises(ValueError, match=match):
            clf.fit(*args)
        assert vars(clf) == state
    with pytest.raises(ValueError, match="4 features"):      # partial_fit goes on: same width
        clf.partial_fit(X[:, :2], y)
    assert vars(clf) == state
    with pytest.raises(ValueError, match="4 features"):
        clf.predict(X[:, :3])


def test_divergence_is_reported_and_keeps_the_last_good_weights():
    X = np.random.default_rng(0).normal(size=(50, 3)) * 1e18     # huge, unscaled inputs
    reg = MLPRegressor(hidden_layer_sizes=(4,), solver="sgd", learning_rate_init=1.0,
                       max_iter=5, random_state=0)
    with pytest.raises(ValueError, match="non-finite .* preprocessed"):
        reg.fit(X, X.sum(axis=1))
    assert np.isfinite(reg.network_.params).all()


@needs_scipy
def test_lbfgs_where_the_loss_overflows_raises_and_keeps_finite_weights():
    X = np.random.default_rng(0).normal(size=(50, 3)) * 1e150   # squared error: 1e300+
    reg = MLPRegressor(solver="lbfgs", hidden_layer_sizes=(4,), random_state=0)
    start = MLPRegressor(solver="sgd", learning_rate_init=1e-300, max_iter=1,
                         hidden_layer_sizes=(4,), random_state=0)
    start.fit(X / 1e150, X.sum(axis=1) / 1e150)      # the same first draw, not moved
    with pytest.raises(ValueError, match="non-finite .* preprocessed.*L-BFGS"):
        reg.fit(X, X.sum(axis=1) / 1e150)
    np.testing.assert_array_equal(reg.network_.params, start.network_.params)


def test_a_diverging_fit_with_early_stopping_keeps_the_best_weights():
    # As scikit-learn: with early stopping, the epoch that diverges scores NaN, the
    # weights of the best validation score are kept and fit returns (with a warning).
    # (At this rate the validation score falls by orders of magnitude each epoch until a
    # step overflows, in epoch 7.)
    X, y = _blobs(n=150)
    reg = MLPRegressor(hidden_layer_sizes=(100,), activation="identity", solver="sgd",
                       learning_rate_init=0.1, max_iter=20, early_stopping=True,
                       random_state=0)
    with pytest.warns(ConvergenceWarning, match="non-finite .* best validation score"):
        reg.fit(X, y.astype(float))
    scores = reg.validation_scores_
    assert len(scores) == reg.n_iter_ == len(reg.loss_curve_) >= 2
    assert np.isnan(scores[-1]) and np.isnan(reg.loss_curve_[-1])
    assert np.isfinite(scores[:-1]).all() and reg.best_validation_score_ == max(scores[:-1])
    np.testing.assert_array_equal(reg.network_.params, reg._best_snapshot[0])
    assert np.isfinite(reg.predict(X)).all()


def test_batch_norm_and_dropout():
    X, y = _blobs()
    kw = dict(hidden_layer_sizes=(16,), max_iter=200, learning_rate_init=0.01, random_state=0)
    clf = MLPClassifier(batch_norm=True, dropout=0.1, **kw).fit(X, y)
    assert [type(layer).__name__ for layer in clf.network_.layers] == [
        "Dense", "BatchNorm", "Activation", "Dropout", "Dense"]
    assert clf.score(X, y) > 0.95
    assert [c.shape for c in clf.coefs_] == [(4, 16), (16, 3)]   # the Dense layers only
    assert not clf.network_.training                          # predictions in eval mode:
    np.testing.assert_array_equal(clf.predict_proba(X), clf.predict_proba(X))   # no dropout
    running_var = clf.network_.layers[1].running_var
    assert running_var.shape == (16,) and not np.allclose(running_var, 1)  # batch statistics
    # early stopping restores the best epoch's running statistics with its weights
    best = MLPClassifier(batch_norm=True, early_stopping=True, **kw).fit(X, y)
    snapshot_params, snapshot_buffers = best._best_snapshot
    np.testing.assert_array_equal(best.network_.params, snapshot_params)
    np.testing.assert_array_equal(best.network_.buffers, snapshot_buffers)


def test_unfitted_estimators_pickle():
    clf = pickle.loads(pickle.dumps(MLPClassifier(hidden_layer_sizes=(7,), alpha=0.5)))
    assert clf.get_params()["hidden_layer_sizes"] == (7,) and clf.alpha == 0.5


def test_fitted_estimators_pickle_copy_and_go_on_training():
    X, y = _blobs()
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, shuffle=False, random_state=0)
    clf.fit(X, y)
    for copy in (pickle.loads(pickle.dumps(clf)), copy_module.deepcopy(clf)):
        np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
        assert copy.loss_curve_ == clf.loss_curve_ and copy.network_ is not clf.network_
        copy.partial_fit(X, y)                      # the Adam state came along
        twin = copy_module.deepcopy(clf).partial_fit(X, y)
        np.testing.assert_array_equal(copy.network_.params, twin.network_.params)
    before = clf.network_.params.copy()
    copy_module.deepcopy(clf).partial_fit(X, y)     # the copy trains alone
    np.testing.assert_array_equal(clf.network_.params, before)


# --------------------------------------------------------------------------- no scikit-learn

def test_works_without_scikit_learn():
    """In a fresh interpreter where importing sklearn fails, the fallbacks take over."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["sklearn"] = None           # any 'import sklearn...' raises ImportError
        import numpy as np
        from backprop import datasets, estimators
        from backprop.estimators import MLPClassifier, MLPRegressor, NotFittedError
        assert not estimators.HAVE_SKLEARN
        HAVE_SCIPY = estimators.minimize is not None
        X, y = datasets.load_digits()
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=100, learning_rate_init=0.01,
                            random_state=0, early_stopping=True)
        clf.fit(X[:1500], y[:1500])
        assert clf.score(X[1500:], y[1500:]) > 0.9, clf.score(X[1500:], y[1500:])
        assert clf.n_features_in_ == 64 and len(clf.validation_scores_) == clf.n_iter_
        assert clf.get_params()["hidden_layer_sizes"] == (32,)
        assert repr(clf.set_params(alpha=0.1)).startswith("MLPClassifier(")
        online = MLPClassifier(hidden_layer_sizes=(8,)).partial_fit(X, y, classes=range(10))
        assert online.predict_proba(X).shape == (1797, 10)
        reg = MLPRegressor(hidden_layer_sizes=(16,), max_iter=50, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reg.fit(X, y.astype(float))
        assert reg.score(X, y) > 0.5 and reg.predict(X).shape == (1797,)
        lbfgs = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(16,), max_iter=100,
                              random_state=0)
        assert not hasattr(lbfgs, "partial_fit")
        if HAVE_SCIPY:
            lbfgs.fit(X[:1500], y[:1500])       # scikit-learn's L-BFGS scores 0.896 here
            assert lbfgs.score(X[1500:], y[1500:]) > 0.85, lbfgs.score(X[1500:], y[1500:])
        for call, error in ((lambda: MLPRegressor().predict(X), NotFittedError),
                            (lambda: reg.predict(X[:, :5]), ValueError),
                            (lambda: reg.fit(X, np.full(1797, np.inf)), ValueError),
                            (lambda: clf.fit(X, y + 0.5), ValueError),
                            (lambda: clf.set_params(alpha_=1), ValueError)):
            try:
                call()
            except error:
                pass
            else:
                raise AssertionError("no error")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_lbfgs_without_scipy_is_refused():
    """Without SciPy (and so without scikit-learn, which needs it) solver='lbfgs' is
    refused before anything changes, naming what to install; the other solvers work."""
    script = textwrap.dedent("""
        import sys
        sys.modules["scipy"] = None             # any 'import scipy...' raises ImportError
        import numpy as np
        from backprop.estimators import MLPClassifier
        X, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40) % 2
        clf = MLPClassifier(solver="lbfgs", hidden_layer_sizes=(4,))
        try:
            clf.fit(X, y)
        except ImportError as error:
            assert "pip install scipy" in str(error), error
        else:
            raise AssertionError("no error")
        assert not any(k.endswith("_") for k in vars(clf))
        clf.set_params(solver="adam", max_iter=5)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(X, y)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
