"""Checkpoints: exact resume, atomic writes, and refusal of bad files."""
import json
import os

import numpy as np
import pytest

import backprop as bp
from backprop import checkpoint, datasets, record
from conftest import make_net


def small_job(optimizer):
    X, y = datasets.load_digits()
    net = make_net([64, 16, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                   optimizer=optimizer, seed=5)
    return net, X[:400], y[:400]


@pytest.mark.parametrize("optimizer", [lambda: bp.Adam(amsgrad=True), lambda: bp.SGD(lr=0.05, momentum=0.9),
                                       lambda: bp.RMSprop(centered=True, momentum=0.5), bp.Adagrad])
def test_resume_continues_bit_for_bit(optimizer, tmp_path):
    straight, X, y = small_job(optimizer())
    straight.fit(X, y, epochs=4, progress=False)

    first, _, _ = small_job(optimizer())
    first.fit(X, y, epochs=2, progress=False)
    first.save(tmp_path / "ckpt.npz")
    resumed = bp.Network.load(tmp_path / "ckpt.npz")
    resumed.fit(X, y, epochs=2, progress=False)

    np.testing.assert_array_equal(resumed.params, straight.params)
    for name in straight.optimizer.state:
        np.testing.assert_array_equal(resumed.optimizer.state[name], straight.optimizer.state[name])
    assert resumed.epoch == 4 and resumed.history.loss == straight.history.loss


def test_round_trip_keeps_everything(tmp_path):
    net, X, y = small_job(bp.Adam(lr=3e-3, betas=(0.8, 0.99)))
    net.fit(X, y, epochs=1, progress=False)
    net.save(tmp_path / "a.npz")
    back = bp.Network.load(tmp_path / "a.npz")
    assert back.config() == net.config()
    assert back.optimizer.hyperparameters() == net.optimizer.hyperparameters()
    assert back.optimizer.steps == net.optimizer.steps
    np.testing.assert_array_equal(back.predict_proba(X), net.predict_proba(X))


def test_crash_between_write_and_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    net, X, y = small_job(bp.Adam())
    path = tmp_path / "model.npz"
    net.save(path)
    old = path.read_bytes()
    net.fit(X, y, epochs=1, progress=False)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        net.save(path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.npz"]         # no temporary file left behind
    monkeypatch.undo()
    np.testing.assert_array_equal(bp.Network.load(path).params, small_job(bp.Adam())[0].params)


def test_truncated_file_is_refused(tmp_path):
    net, _, _ = small_job(bp.Adam())
    net.save(tmp_path / "m.npz")
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        bp.Network.load(tmp_path / "cut.npz")


def test_foreign_and_garbage_files_are_refused(tmp_path):
    np.savez(tmp_path / "other.npz", X=np.zeros(3))
    with pytest.raises(ValueError, match="not a backprop checkpoint"):
        bp.Network.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"hello world")
    with pytest.raises(ValueError):
        bp.Network.load(tmp_path / "junk.npz")


def rewrite_header(path, change):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(arrays["header"].tobytes())
    change(header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_newer_version_and_inconsistent_contents_are_refused(tmp_path):
    net, _, _ = small_job(bp.Adam())
    path = tmp_path / "m.npz"
    net.save(path)
    rewrite_header(path, lambda h: h.update(version=record.VERSION + 1))
    with pytest.raises(ValueError, match="newer"):
        bp.Network.load(path)
    net.save(path)
    rewrite_header(path, lambda h: h["network"]["layers"][0]["config"].update(out_features=17))
    with pytest.raises(ValueError, match=r"last dimension is 16, but its input is \(17,\)"):
        bp.Network.load(path)

    def wider_hidden_layer(h):
        h["network"]["layers"][0]["config"]["out_features"] = 17
        h["network"]["layers"][1]["config"]["in_features"] = 17

    net.save(path)
    rewrite_header(path, wider_hidden_layer)
    with pytest.raises(ValueError, match="array 'params' has shape"):
        bp.Network.load(path)


def test_loading_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, header=np.array([{"format": "backprop-checkpoint"}], dtype=object),
             params=np.zeros(3))
    with pytest.raises(ValueError):
        bp.Network.load(path)
