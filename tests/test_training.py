"""fit, predict, evaluate, schedules: training for real on the shipped datasets."""
import numpy as np
import pytest

import backprop as bp
from backprop import datasets, schedules
from conftest import make_net


def digits_split():
    X, y = datasets.load_digits()
    return datasets.train_test_split(X, y, test_size=0.2, seed=0, stratify=True)


def test_digits_default_recipe_reaches_97_percent():
    """The recipe of `python -m backprop train` (64-128-10 relu, Adam 1e-3, 30 epochs of
    batches of 32, 10% held for validation)."""
    X_train, X_test, y_train, y_test = digits_split()
    net = bp.Network([bp.Dense(64, 128, "relu"), bp.Dense(128, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), seed=0)
    history = net.fit(X_train, y_train, epochs=30, batch_size=32, validation_split=0.1,
                      progress=False)
    assert history.epochs == 30 and net.epoch == 30
    assert history.loss[-1] < history.loss[0] / 10
    assert net.evaluate(X_test, y_test)["accuracy"] >= 0.97


def test_mnist_sample_reaches_93_percent():
    X, y = datasets.load_mnist_sample()
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, test_size=1000, seed=0,
                                                                 stratify=True)
    net = bp.Network([bp.Dense(784, 128, "relu"), bp.Dense(128, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), seed=0)
    net.fit(X_train, y_train, epochs=10, batch_size=64, progress=False)
    assert net.evaluate(X_test, y_test)["accuracy"] >= 0.93


def test_fit_is_reproducible_from_the_seed():
    X_train, _, y_train, _ = digits_split()
    nets = [make_net([64, 16, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                     optimizer=bp.Adam(), seed=3) for _ in range(2)]
    for net in nets:
        net.fit(X_train, y_train, epochs=2, progress=False)
    np.testing.assert_array_equal(nets[0].params, nets[1].params)


def test_history_records_validation_lr_and_gradient_norms():
    X_train, X_test, y_train, y_test = digits_split()
    net = make_net([64, 32, 10], ["tanh", "softmax"], "cross_entropy", optimizer=bp.SGD(lr=0.1))
    sched = schedules.StepLR(net.optimizer, step_size=2, gamma=0.5)
    history = net.fit(X_train, y_train, epochs=4, validation_data=(X_test, y_test),
                      lr_schedule=sched, progress=False)
    assert history.lr == [0.1, 0.1, 0.05, 0.05]   # recorded before each epoch's schedule step
    assert net.optimizer.lr == 0.025
    assert all(0 <= a <= 1 for a in history.val_accuracy)
    assert len(history.grad_norms) == 4 and all(len(row) == 2 for row in history.grad_norms)
    assert all(n > 0 for row in history.grad_norms for n in row)
    assert history.val_loss[-1] == pytest.approx(net.evaluate(X_test, y_test)["loss"])


def test_early_stopping_keeps_the_best_weights(rng):
    X = rng.normal(size=(64, 5))
    y = rng.integers(0, 3, 64)                       # pure noise: validation loss soon rises
    Xv, yv = rng.normal(size=(64, 5)), rng.integers(0, 3, 64)
    net = make_net([5, 64, 3], ["relu", "softmax"], "cross_entropy", optimizer=bp.Adam(lr=0.05))
    history = net.fit(X, y, epochs=100, batch_size=8, validation_data=(Xv, yv),
                      early_stopping=3, progress=False)
    assert history.epochs < 100
    best = min(history.val_loss)
    assert history.val_loss.index(best) == history.epochs - 4
    assert net.evaluate(Xv, yv)["loss"] == pytest.approx(best)


def test_clip_grad_norm_bounds_every_update(rng):
    X, y = rng.normal(size=(32, 4)) * 100, rng.normal(size=(32, 2)) * 100
    net = make_net([4, 2], "identity", "mse", optimizer=bp.SGD(lr=1.0))
    before = net.params.copy()
    net.fit(X, y, epochs=1, batch_size=32, clip_grad_norm=0.5, progress=False)
    # one SGD step with lr 1 moves the parameters by exactly the clipped gradient
    assert np.linalg.norm(net.params - before) == pytest.approx(0.5)


def test_divergence_names_epoch_step_and_layer_and_keeps_good_weights(rng):
    X, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1)) * 1e3
    net = make_net([4, 8, 1], ["relu", "identity"], "mse", optimizer=bp.SGD(lr=10.0))
    with pytest.raises(FloatingPointError, match=r"epoch \d+, step \d+.*first non-finite layer"):
        net.fit(X, y, epochs=50, batch_size=16, progress=False)
    assert np.isfinite(net.params).all()


def test_divergence_inside_a_layer_is_located(rng):
    """float32 activations overflow to inf in the hidden layer before anything else."""
    net = make_net([4, 8, 3], ["relu", "softmax"], "cross_entropy", dtype="float32")
    net.layers[0].weight[...] = 1e30
    X, y = np.full((4, 4), 1e10), np.zeros(4, dtype=int)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 0.*layers\[0\]"):
        net.fit(X, y, epochs=1, batch_size=4, progress=False)
    assert (net.layers[0].weight == np.float32(1e30)).all()   # the refused step changed nothing


def test_predict_and_predict_proba(rng):
    net = make_net([3, 4], "softmax", "cross_entropy")
    X = rng.normal(size=(2500, 3))                   # larger than one internal batch
    proba = net.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1)
    np.testing.assert_array_equal(net.predict(X), proba.argmax(axis=1))
    regressor = make_net([3, 2], "identity", "mse")
    np.testing.assert_allclose(regressor.predict(X), X @ regressor.layers[0].weight.T
                               + regressor.layers[0].bias, rtol=1e-12)
    with pytest.raises(ValueError, match="predict_proba"):
        regressor.predict_proba(X)


def test_evaluate_matches_a_single_big_batch(rng):
    net = make_net([3, 5, 4], ["tanh", "softmax"], "cross_entropy")
    X, y = rng.normal(size=(3000, 3)), rng.integers(0, 4, 3000)
    scores = net.evaluate(X, y, batch_size=128)
    assert scores["loss"] == pytest.approx(net.loss_of(X, y), rel=1e-12)
    assert scores["accuracy"] == np.mean(net.predict(X) == y)


@pytest.mark.parametrize("make,expected", [
    (lambda o: schedules.StepLR(o, step_size=3, gamma=0.1), [1, 1, 0.1, 0.1, 0.1, 0.01]),
    (lambda o: schedules.ExponentialLR(o, gamma=0.5), [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]),
    # eta_min + (1 - eta_min)(1 + cos(pi t / 4)) / 2 with eta_min = 0
    (lambda o: schedules.CosineAnnealingLR(o, T_max=4),
     [(1 + np.cos(np.pi * t / 4)) / 2 for t in range(1, 7)]),
])
def test_schedules_follow_their_formulas(make, expected):
    opt = bp.SGD(lr=1.0)
    sched = make(opt)
    seen = []
    for _ in range(6):
        sched.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, expected, rtol=1e-12, atol=1e-15)


def test_reduce_on_plateau():
    opt = bp.SGD(lr=1.0)
    sched = schedules.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    for loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.8]:
        sched.step(loss)
    # 0.9 then three epochs without improvement: the third exceeds patience 2
    assert opt.lr == 0.5


def test_fit_validates_its_arguments(rng):
    net = make_net([3, 2], "softmax", "cross_entropy")
    X, y = rng.normal(size=(10, 3)), rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="shape"):
        net.fit(X[:, :2], y, progress=False)
    with pytest.raises(ValueError, match="same length"):
        net.fit(X, y[:5], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        net.fit(X, y, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="validation_split"):
        net.fit(X, y, validation_split=1.5, progress=False)


@pytest.mark.parametrize("spoil", ["label", "nan", "id"])
def test_bad_training_data_is_refused_before_the_first_step(spoil):
    # A bad row anywhere in X or y is refused before any update, whatever batch it falls
    # in (it used to be found by the step reaching it, after earlier steps had trained).
    rng = np.random.default_rng(0)
    if spoil == "id":
        net = bp.Network([bp.Embedding(10, 3), bp.Flatten(), bp.Dense(12, 3, "softmax")],
                         loss="cross_entropy", seed=0, input_shape=(4,))
        X, y = rng.integers(0, 10, (20, 4)), rng.integers(0, 3, 20)
        X[13, 2] = 10
    else:
        net = bp.Network([bp.Dense(5, 3, "softmax")], loss="cross_entropy", seed=0)
        X, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
        if spoil == "label":
            y[13] = 3
        else:
            X[13, 2] = np.nan
    params, rng_state = net.params.copy(), net.rng.bit_generator.state
    with pytest.raises(ValueError, match="training data"):
        net.fit(X, y, epochs=2, batch_size=4, progress=False)
    np.testing.assert_array_equal(net.params, params)
    assert net.optimizer.steps == 0 and net.epoch == 0
    assert net.rng.bit_generator.state == rng_state
