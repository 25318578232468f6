"""The scikit-learn-style estimators."""
import numpy as np
import pytest

from backprop import datasets
from backprop.estimators import MLPClassifier, MLPRegressor


def test_classifier_learns_digits_with_arbitrary_labels():
    X, y = datasets.load_digits()
    names = np.array(list("abcdefghij"))[y]                 # labels need not be 0..k-1
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, names, seed=0, stratify=True)
    clf = MLPClassifier(hidden_layer_sizes=(128,), epochs=30, random_state=0).fit(X_train, y_train)
    assert set(clf.classes_) == set("abcdefghij")
    assert clf.predict(X_test).dtype == names.dtype
    assert clf.score(X_test, y_test) > 0.95
    np.testing.assert_allclose(clf.predict_proba(X_test).sum(axis=1), 1, rtol=1e-5)


def test_regressor_fits_a_smooth_function():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(512, 2))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1]
    reg = MLPRegressor(hidden_layer_sizes=(32, 32), activation="tanh", epochs=100,
                       learning_rate=3e-3, random_state=0).fit(X, y)
    assert reg.predict(X).shape == (512,)
    assert reg.score(X, y) > 0.95


def test_params_round_trip_and_bad_names():
    clf = MLPClassifier(epochs=3)
    assert clf.get_params()["epochs"] == 3
    assert clf.set_params(epochs=5, learning_rate=0.01) is clf and clf.epochs == 5
    with pytest.raises(ValueError, match="(?i)invalid parameter 'epoch'"):
        clf.set_params(epoch=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        MLPClassifier(optimizer="Adamax").fit(np.zeros((4, 2)), [0, 1, 0, 1])


def test_works_inside_scikit_learn():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = datasets.load_digits()
    clf = MLPClassifier(hidden_layer_sizes=(32,), epochs=10, random_state=0)
    assert clone(clf).get_params() == clf.get_params()
    scores = cross_val_score(make_pipeline(StandardScaler(), clf), X, y, cv=3)
    assert scores.min() > 0.85, sklearn.__version__
