"""Pickle and deepcopy every public object; copies continue bit for bit, across processes
too (joblib, multiprocessing, Dask and Ray carry objects by pickling them)."""
import copy
import multiprocessing as mp
import pickle

import numpy as np
import pytest

import backprop as bp
from backprop import schedules
from backprop.optim import OPTIMIZERS
from conftest import OPTIMIZER_CASES, OPTIMIZER_IDS

COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}


def network(optimizer=None, dtype="float32"):
    return bp.Network([bp.Dense(5, 12, bias=False), bp.BatchNorm(12), bp.Activation("relu"),
                       bp.Dropout(0.2), bp.Residual(bp.Dense(12, 12, "tanh"), bp.LayerNorm(12)),
                       bp.Dense(12, 3, "softmax")],
                      loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=1e-2),
                      dtype=dtype, seed=2)


@pytest.fixture
def data(rng):
    return rng.normal(size=(40, 5)), rng.integers(0, 3, 40)


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS)
@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES, ids=OPTIMIZER_IDS)
def test_a_copied_network_trains_on_bit_identically(copier, name, kwargs, data):
    X, y = data
    net = network(OPTIMIZERS[name](**kwargs))
    net.fit(X, y, epochs=1, batch_size=8, progress=False)
    net.eval()
    twin = copier(net)
    assert twin.training is False and twin.history.loss == net.history.loss
    assert twin.rng.bit_generator.state == net.rng.bit_generator.state
    for n in (net, twin):
        n.fit(X, y, epochs=2, batch_size=8, progress=False)
    np.testing.assert_array_equal(twin.params, net.params)
    np.testing.assert_array_equal(twin.buffers, net.buffers)
    for key in net.optimizer.state:
        np.testing.assert_array_equal(twin.optimizer.state[key], net.optimizer.state[key])
    assert not np.shares_memory(twin.params, net.params)


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS)
def test_every_layer_copies_free_with_its_values(copier):
    net = network()
    net.buffers[:] = np.arange(net.buffers.size)          # recognisable running statistics
    for layer in net._plan.layers:
        twin = copier(layer)
        assert type(twin) is type(layer) and twin.config() == layer.config()
        other = bp.Network([twin], dtype="float32") if layer.fixes_input() else None
        if other is not None:                               # the copy carries its arrays
            for name, _, _ in layer.parameters():
                np.testing.assert_array_equal(getattr(twin, name), getattr(layer, name))
            for name, _, _ in layer.buffers():
                np.testing.assert_array_equal(getattr(twin, name), getattr(layer, name))
    fresh = copier(bp.Dense(3, 4))                          # a free layer copies free
    assert fresh.weight is None


@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS)
def test_optimizers_schedules_history_and_callbacks_copy(copier, data):
    X, y = data
    net = network(bp.SGD(lr=0.1, momentum=0.9))
    net.fit(X, y, epochs=1, progress=False)
    opt = copier(net.optimizer)
    assert repr(opt) == repr(net.optimizer) and not opt.attached
    other = network(opt)                                   # takes the carried state
    np.testing.assert_array_equal(opt.state["momentum_buffer"],
                                  net.optimizer.state["momentum_buffer"])
    assert opt.steps == net.optimizer.steps
    for schedule in (schedules.StepLR(other.optimizer, 2, gamma=0.5),
                     schedules.ExponentialLR(other.optimizer, 0.9),
                     schedules.CosineAnnealingLR(other.optimizer, 10),
                     schedules.ReduceLROnPlateau(other.optimizer, patience=1)):
        schedule.step(1.0)
        twin = copier(schedule)
        assert twin.state_dict() == schedule.state_dict()
        if not isinstance(schedule, schedules.ReduceLROnPlateau):
            assert twin.lr_at(3) == schedule.lr_at(3)
    history = copier(net.history)
    assert history.to_dict() == net.history.to_dict()
    monitor = copier(bp.GradientMonitor(vanishing=1e-3))
    assert monitor.vanishing == 1e-3


def _train_in_worker(payload):
    net, X, y = pickle.loads(payload)
    net.fit(X, y, epochs=2, batch_size=8, progress=False)
    return pickle.dumps(net)


def test_a_network_trains_identically_in_another_process(data):
    X, y = data
    net = network(dtype="float64")
    payload = pickle.dumps((net, X, y))
    with mp.get_context("spawn").Pool(1) as pool:
        trained = pickle.loads(pool.apply(_train_in_worker, (payload,)))
    net.fit(X, y, epochs=2, batch_size=8, progress=False)
    np.testing.assert_array_equal(trained.params, net.params)
    np.testing.assert_array_equal(trained.buffers, net.buffers)


def test_loading_files_still_never_unpickles(tmp_path):
    """Pickling goes through the checkpoint's plain data, but files are not pickles: a
    checkpoint holding a pickled object is refused without running it."""
    path = tmp_path / "evil.npz"
    np.savez(path, header=np.array([{"format": "backprop-checkpoint"}], dtype=object))
    with pytest.raises(ValueError):
        bp.Network.load(path)
