"""backprop's MLPClassifier / MLPRegressor against scikit-learn itself: its estimator
checks, the same parameters, identical training in float64, its meta-estimators, and a
script written for sklearn.neural_network run with the import swapped."""
import functools
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn import neural_network                                      # noqa: E402
from sklearn.base import clone                                          # noqa: E402
from sklearn.datasets import load_digits, make_friedman1                # noqa: E402
from sklearn.model_selection import (GridSearchCV, cross_val_score,     # noqa: E402
                                     train_test_split)
from sklearn.neural_network import _stochastic_optimizers               # noqa: E402
from sklearn.pipeline import make_pipeline                              # noqa: E402
from sklearn.preprocessing import StandardScaler                        # noqa: E402
from sklearn.utils.estimator_checks import estimator_checks_generator   # noqa: E402

from backprop.estimators import MLPClassifier, MLPRegressor            # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# --------------------------------------------------------------------------- estimator checks

# max_iter=100 as scikit-learn's own test suite sets for its MLPs: the defaults (X's
# precision, Adam), L-BFGS, and float32 forced.
CHECKED = [MLPClassifier(max_iter=100), MLPRegressor(max_iter=100),
           MLPClassifier(solver="lbfgs", max_iter=100), MLPRegressor(solver="lbfgs", max_iter=100),
           MLPClassifier(max_iter=100, dtype="float32"), MLPRegressor(max_iter=100, dtype="float32")]

# With dtype="float32" forced on these checks' float64 data, a row of weight k and k
# copies of the row are summed in a different order, so the two fits agree to float32
# rounding, not to the check's rtol of 1e-7 (below float32's own 1.2e-7): for those
# instances the two checks are replaced by test_float32_sample_weight_equivalence,
# the same fits compared at float32's tolerance.  Every other check runs on every
# instance, none expected to fail.
FLOAT32_REPLACED = {"check_sample_weight_equivalence_on_dense_data",
                    "check_sample_weight_equivalence_on_sparse_data"}


def _check_name(check):
    return check.func.__name__ if isinstance(check, functools.partial) else check.__name__


def estimator_checks():
    for estimator in CHECKED:
        for pair in estimator_checks_generator(estimator, legacy=True, mark=None):
            if estimator.dtype == "float32" and _check_name(pair[1]) in FLOAT32_REPLACED:
                continue
            yield pair


def _array_api_check_in_subprocess(estimator, check):
    # scikit-learn runs this check only when SciPy was imported with SCIPY_ARRAY_API=1,
    # which cannot be switched on inside this process (SciPy is already imported), so it
    # runs in a fresh interpreter with the same estimator and arguments.
    script = textwrap.dedent(f"""
        import pickle, sys, warnings
        warnings.simplefilter("ignore")
        from sklearn.utils.estimator_checks import check_array_api_input
        estimator = pickle.loads(sys.stdin.buffer.read())
        check_array_api_input(*{check.args!r}, estimator, **{check.keywords!r})
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(estimator),
                            capture_output=True, timeout=300,
                            env={**__import__("os").environ, "SCIPY_ARRAY_API": "1"})
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "ok"


def _check_id(value):
    if isinstance(value, (MLPClassifier, MLPRegressor)):
        return repr(value)
    keywords = value.keywords if isinstance(value, functools.partial) else {}
    return _check_name(value) + "".join(f"({k}={v})" for k, v in keywords.items())


@pytest.mark.parametrize("estimator, check", list(estimator_checks()), ids=_check_id)
def test_scikit_learn_estimator_checks(estimator, check):
    name = _check_name(check)
    if name == "check_array_api_input":
        _array_api_check_in_subprocess(estimator, check)
    elif name == "check_classifiers_multilabel_output_format_decision_function":
        # scikit-learn skips this check for classifiers without decision_function; its own
        # MLPClassifier has none, and neither has this drop-in replacement.
        assert not hasattr(estimator, "decision_function")
    else:
        check(estimator)


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
@pytest.mark.parametrize("sparse", [False, True])
def test_float32_sample_weight_equivalence(Estimator, sparse):
    # scikit-learn's check_sample_weight_equivalence_on_{dense,sparse}_data on the forced
    # float32 estimators: integer weights (zeros included) against the rows repeated,
    # the same data and seeds.  Each of the 100 epochs adds float32 rounding (2^-24
    # relative per operation, different between the two fits only in the order of the
    # sums); 1e-5 is 100 epochs of a few roundings, and 1e4x below the differences a
    # wrong weighting makes (the last assertion).
    from scipy import sparse as scipy_sparse
    rng = np.random.RandomState(42)
    X = rng.rand(15, 30)
    y = rng.randint(0, 3, size=15)
    weights = rng.randint(0, 5, size=15)
    X_repeated, y_repeated = X.repeat(weights, axis=0), y.repeat(weights)
    order = np.random.RandomState(0).permutation(15)
    X_weighted, y_weighted, w = X[order], y[order], weights[order]
    if Estimator is MLPRegressor:
        y_repeated, y_weighted = y_repeated.astype(float), y_weighted.astype(float)
    if sparse:
        X_repeated, X_weighted = scipy_sparse.csr_array(X_repeated), scipy_sparse.csr_array(X_weighted)
    method = "predict_proba" if Estimator is MLPClassifier else "predict"
    fit = functools.partial(Estimator, max_iter=100, dtype="float32", random_state=0)
    repeated = getattr(fit().fit(X_repeated, y_repeated), method)(X)
    weighted = getattr(fit().fit(X_weighted, y_weighted, sample_weight=w), method)(X)
    unweighted = getattr(fit().fit(X_weighted, y_weighted), method)(X)
    np.testing.assert_allclose(weighted, repeated, rtol=1e-5, atol=1e-6)
    assert np.abs(unweighted - repeated).max() > 1e-2


# --------------------------------------------------------------------------- the same API

@pytest.mark.parametrize("ours, theirs", [(MLPClassifier, neural_network.MLPClassifier),
                                          (MLPRegressor, neural_network.MLPRegressor)])
def test_same_parameters_defaults_and_order(ours, theirs):
    import inspect
    mine = inspect.signature(ours.__init__).parameters
    reference = inspect.signature(theirs.__init__).parameters
    for name, parameter in reference.items():
        assert name in mine, name
        assert mine[name].default == parameter.default, name
        assert mine[name].kind == parameter.kind, name          # positional ones stay so
    assert list(mine)[:len(reference)] == list(reference)        # in the same order
    assert set(mine) - set(reference) == {"dtype", "precision", "n_threads", "batch_norm",
                                             "dropout"}


# --------------------------------------------------------------------------- same numbers

def _data(kind):
    X, y = load_digits(return_X_y=True)
    X = X[:600] / 16
    y = y[:600]
    if kind == "binary":
        return X, y % 2
    if kind == "multilabel":
        return X, np.stack([y % 2, y % 3 == 0, y > 4], axis=1).astype(int)
    if kind == "regression":
        return X[:, :20], np.stack([y / 9, np.cos(y)], axis=1)
    if kind == "poisson":
        return X[:, :20], y
    return X, y


SGD_CASES = {
    "constant": ("multiclass", dict()),
    "no-nesterov": ("multiclass", dict(nesterovs_momentum=False, momentum=0.5)),
    "invscaling": ("multiclass", dict(learning_rate="invscaling", learning_rate_init=0.5,
                                      power_t=0.3)),
    "adaptive": ("multiclass", dict(learning_rate="adaptive", tol=0.05, n_iter_no_change=1,
                                    max_iter=40)),
    "tol-stop": ("multiclass", dict(tol=0.05, n_iter_no_change=2, max_iter=60)),
    "early-stopping": ("multiclass", dict(early_stopping=True, n_iter_no_change=2,
                                          max_iter=60)),
    "early-stopping-binary": ("binary", dict(early_stopping=True, validation_fraction=0.2)),
    "binary": ("binary", dict(activation="logistic", batch_size=64)),
    "multilabel": ("multilabel", dict(activation="identity", alpha=0.01)),
    "regression": ("regression", dict(activation="tanh", learning_rate_init=0.01,
                                      batch_size=50, shuffle=False)),
    "poisson": ("poisson", dict(learning_rate_init=0.001)),
    "sample-weight": ("multiclass", dict(alpha=0.1)),
}


def _fit_both(kind, params, sample_weight=None):
    X, y = _data(kind)
    params = {"hidden_layer_sizes": (20, 10), "random_state": 0, "max_iter": 15, **params}
    if kind == "poisson":
        params["loss"] = "poisson"
    if kind in ("regression", "poisson"):
        theirs, ours = neural_network.MLPRegressor, MLPRegressor
    else:
        theirs, ours = neural_network.MLPClassifier, MLPClassifier
    a = theirs(**params).fit(X, y, sample_weight=sample_weight)
    b = ours(dtype="float64", **params).fit(X, y, sample_weight=sample_weight)
    return X, a, b


def _assert_same_fit(X, a, b, rtol):
    assert b.n_iter_ == a.n_iter_ and b.t_ == a.t_
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=rtol)
    for mine, theirs in zip(b.coefs_ + b.intercepts_, a.coefs_ + a.intercepts_):
        np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=rtol)
    if a.best_loss_ is None:
        assert b.best_loss_ is None
    else:
        assert b.best_loss_ == pytest.approx(a.best_loss_, rel=rtol)
    if a.validation_scores_ is not None:
        np.testing.assert_allclose(b.validation_scores_, a.validation_scores_, rtol=rtol)
        assert b.best_validation_score_ == pytest.approx(a.best_validation_score_, rel=rtol)
    else:
        assert b.validation_scores_ is None
    method = "predict_proba" if hasattr(a, "predict_proba") else "predict"
    np.testing.assert_allclose(getattr(b, method)(X), getattr(a, method)(X), rtol=rtol,
                               atol=rtol)
    if hasattr(a, "classes_"):
        np.testing.assert_array_equal(b.predict(X), a.predict(X))


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_float64_sgd_training_is_scikit_learns(case):
    """Same draws for the initial weights, shuffles and validation split, same gradients
    and update rule: in float64 the whole fit agrees with scikit-learn to rounding."""
    kind, params = SGD_CASES[case]
    sample_weight = None
    if case == "sample-weight":
        sample_weight = np.random.default_rng(0).integers(0, 4, size=600)
    X, a, b = _fit_both(kind, dict(solver="sgd", **params), sample_weight)
    _assert_same_fit(X, a, b, rtol=1e-9)


def _adam_with_pytorchs_epsilon(self, grads):
    # scikit-learn's Adam step, except that epsilon is added to sqrt(v_hat) (bias-
    # corrected) as PyTorch and backprop do, instead of to sqrt(v).
    self.t += 1
    self.ms = [self.beta_1 * m + (1 - self.beta_1) * g for m, g in zip(self.ms, grads)]
    self.vs = [self.beta_2 * v + (1 - self.beta_2) * g ** 2 for v, g in zip(self.vs, grads)]
    c1, c2 = 1 - self.beta_1 ** self.t, 1 - self.beta_2 ** self.t
    return [-self.learning_rate_init / c1 * m / (np.sqrt(v) / np.sqrt(c2) + self.epsilon)
            for m, v in zip(self.ms, self.vs)]


@pytest.mark.parametrize("case", ["constant", "early-stopping", "binary", "regression",
                                  "multilabel"])
def test_float64_adam_training_is_scikit_learns_but_for_epsilon(case, monkeypatch):
    """Adam differs from scikit-learn's only in where epsilon goes: with scikit-learn's
    step patched to PyTorch's placement the fits agree to rounding."""
    monkeypatch.setattr(_stochastic_optimizers.AdamOptimizer, "_get_updates",
                        _adam_with_pytorchs_epsilon)
    kind, params = SGD_CASES[case]
    X, a, b = _fit_both(kind, {"learning_rate_init": 0.01, **params, "solver": "adam"})
    _assert_same_fit(X, a, b, rtol=1e-9)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression",
                                  "poisson"])
def test_float64_lbfgs_is_scikit_learns(kind):
    """L-BFGS from the same weights, with the same objective and gradient (to rounding)
    and the same SciPy: the same iterations and, to rounding, the same fit."""
    params = dict(solver="lbfgs", alpha=0.01, max_iter=30, activation="tanh")
    X, a, b = _fit_both(kind, params)
    assert b.n_iter_ == a.n_iter_
    assert b.loss_ == pytest.approx(a.loss_, rel=1e-9)
    for mine, theirs in zip(b.coefs_ + b.intercepts_, a.coefs_ + a.intercepts_):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


def test_early_stopping_split_is_stratified_as_scikit_learns():
    # A binary y is stratified on scikit-learn's boolean targets: the same error, with
    # the class named 'True'.
    X, y = [[1, 2], [2, 3], [3, 4], [4, 5]], [0, 0, 0, 1]
    messages = []
    for cls in (neural_network.MLPClassifier, MLPClassifier):
        with pytest.raises(ValueError, match="least populated") as error:
            cls(early_stopping=True).fit(X, y)
        messages.append(str(error.value))
    assert messages[1] == messages[0] and "['True']" in messages[0]


def _scores(estimator_class, X_train, X_test, y_train, y_test, seeds, **params):
    return np.array([estimator_class(random_state=seed, **params).fit(X_train, y_train)
                     .score(X_test, y_test) for seed in seeds])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("task", ["digits", "friedman1"])
def test_scores_within_noise_of_scikit_learn(task, dtype):
    """Default settings (Adam, X's precision) against scikit-learn with the same
    parameters, on float64 and on float32 data (both libraries then train in float32).

    "Noise" is scikit-learn's own spread over random_state: with 5 seeds, the mean
    scores must differ by less than two standard errors of scikit-learn's mean
    (2 * std / sqrt(5)), and by at most 0.005 when that spread is smaller (digits: the
    test set has 450 images, 0.005 is two of them).  Each seed starts both libraries
    from the same weights and shuffles, so the difference left is Adam's epsilon
    placement (and rounding)."""
    seeds = range(5)
    if task == "digits":
        X, y = load_digits(return_X_y=True)
        data = train_test_split((X / 16).astype(dtype), y, test_size=0.25, random_state=0,
                                stratify=y)
        params = dict(hidden_layer_sizes=(64,), max_iter=60)
        theirs, ours, floor = neural_network.MLPClassifier, MLPClassifier, 0.95
    else:
        X, y = make_friedman1(n_samples=800, noise=0.5, random_state=0)
        data = train_test_split(X.astype(dtype), (y - y.mean()) / y.std(), test_size=0.25,
                                random_state=0)
        params = dict(hidden_layer_sizes=(32,), max_iter=150, learning_rate_init=0.01)
        theirs, ours, floor = neural_network.MLPRegressor, MLPRegressor, 0.85
    reference = _scores(theirs, *data, seeds, **params)
    mine = _scores(ours, *data, seeds, **params)
    assert reference.min() > floor                      # the comparison means something
    noise = max(2 * reference.std(ddof=1) / np.sqrt(len(reference)), 0.005)
    assert abs(mine.mean() - reference.mean()) < noise, (mine, reference)


# --------------------------------------------------------------------------- scikit-learn tools

def test_clone_pipeline_grid_search_and_cross_validation_in_processes():
    X, y = load_digits(return_X_y=True)
    clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=50,
                        random_state=0)
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params()
    pipe = make_pipeline(StandardScaler(), clf)
    scores = cross_val_score(pipe, X, y, cv=3, n_jobs=2)     # workers get pickled copies
    assert scores.min() > 0.85
    search = GridSearchCV(pipe, {"mlpclassifier__alpha": [1e-4, 1e-1],
                                 "mlpclassifier__hidden_layer_sizes": [(16,), (32,)]},
                          cv=3, n_jobs=2).fit(X, y)
    assert search.best_score_ == max(search.cv_results_["mean_test_score"]) > 0.85
    assert search.best_estimator_.score(X, y) > 0.95
    assert isinstance(search.best_estimator_[-1], MLPClassifier)


def test_sparse_input_and_feature_names():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X, y = _data("multiclass")
    dense = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, dtype="float64", random_state=0)
    sparse = clone(dense)
    np.testing.assert_allclose(sparse.fit(scipy_sparse.csr_matrix(X), y).predict_proba(X),
                               dense.fit(X, y).predict_proba(X), rtol=1e-12)
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"])
    reg = MLPRegressor(hidden_layer_sizes=(4,), max_iter=5).fit(frame, y)
    np.testing.assert_array_equal(reg.feature_names_in_, ["a", "b", "c"])
    with pytest.raises(ValueError, match="feature names"):
        reg.predict(frame.rename(columns={"a": "z"}))


SCRIPT = """
import warnings
import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X / 16, y, random_state=0)
clf = MLPClassifier(hidden_layer_sizes=(50,), alpha=1e-4, solver="sgd", learning_rate_init=0.1,
                    max_iter=10, random_state=1, verbose=False)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    clf.fit(X_train, y_train)
print("accuracy", round(clf.score(X_test, y_test), 2))
print("iterations", clf.n_iter_, len(clf.loss_curve_), clf.t_ == 10 * len(X_train))
print("layers", clf.n_layers_, clf.n_outputs_, clf.out_activation_, list(clf.classes_))
print("shapes", [c.shape for c in clf.coefs_], [b.shape for b in clf.intercepts_])
print("proba", clf.predict_proba(X_test[:3]).shape, clf.predict_log_proba(X_test[:3]).shape)
clf.partial_fit(X_train[:100], y_train[:100])
reg = MLPRegressor(hidden_layer_sizes=(20,), early_stopping=True, random_state=0, max_iter=50)
reg.fit(X_train, y_train.astype(float))
print("regressor", reg.predict(X_test[:4]).shape, reg.best_loss_, len(reg.validation_scores_) == reg.n_iter_)
"""


def test_a_scikit_learn_script_runs_with_the_import_swapped():
    swapped = SCRIPT.replace("from sklearn.neural_network import",
                             "from backprop.estimators import")
    assert swapped != SCRIPT
    outputs = []
    for script in (SCRIPT, swapped):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.splitlines())
    reference, mine = outputs
    assert mine[1:] == reference[1:]        # the same attributes, shapes and counts
    accuracy = [float(lines[0].split()[1]) for lines in outputs]
    assert accuracy[0] > 0.9 and abs(accuracy[0] - accuracy[1]) <= 0.02
