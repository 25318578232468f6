"""Threads and processes: the GIL is released, one network refuses concurrent use,
forked children can train, and foreign thread controls are respected."""
import multiprocessing as mp
import subprocess
import sys
import threading

import numpy as np
import pytest

import backprop as bp
from conftest import make_net


def job(seed):
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(128, 200)).astype(np.float32), rng.integers(0, 10, 128)
    net = make_net([200, 128, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                   optimizer=bp.Adam(), seed=seed)
    return net, X, y


def test_two_networks_in_two_threads_match_sequential_training():
    expected = []
    for seed in (1, 2):
        net, X, y = job(seed)
        for _ in range(20):
            net.train_step(X, y)
        expected.append(net.params.copy())
    jobs = [job(1), job(2)]

    def train(i):
        net, X, y = jobs[i]
        for _ in range(20):
            net.train_step(X, y)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (net, _, _), params in zip(jobs, expected):
        np.testing.assert_array_equal(net.params, params)


def test_one_network_from_two_threads_is_refused_not_corrupted():
    """While one thread is inside a step (GIL released), another's call is refused."""
    rng = np.random.default_rng(0)
    net = make_net([1024, 1024, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                   optimizer=bp.SGD(lr=0.01))
    X, y = rng.normal(size=(512, 1024)).astype(np.float32), rng.integers(0, 10, 512)
    errors, running = [], threading.Event()

    def hammer():
        running.wait()
        for _ in range(200):
            try:
                net.forward(X[:4])
            except RuntimeError as e:
                errors.append(str(e))

    other = threading.Thread(target=hammer)
    other.start()
    running.set()
    for _ in range(5):
        net.train_step(X, y)
    other.join()
    assert errors and all("already running a pass in another thread" in e for e in errors)
    # and the network still trains normally afterwards
    assert np.isfinite(net.train_step(X, y))


FORK_CHILD = """
import multiprocessing as mp, numpy as np, backprop as bp
def work(q):
    rng = np.random.default_rng(0)
    net = bp.Network([bp.Dense(256, 256, "relu"), bp.Dense(256, 10, "softmax")],
                     loss="cross_entropy", seed=0)
    X, y = rng.normal(size=(256, 256)), rng.integers(0, 10, 256)
    for _ in range(3):
        loss = net.train_step(X, y)
    q.put(loss)
if __name__ == "__main__":
    bp.set_num_threads(2)
    parent = mp.Queue()
    work(parent)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=work, args=(q,))
    p.start()
    p.join(60)
    assert not p.is_alive(), "the forked child hung"
    assert q.get() == parent.get(), "the child trained differently"
    print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fork does not exist on Windows")
def test_forked_child_can_train_after_the_parent_used_threads(tmp_path):
    """GNU libgomp hangs a forked child that enters a parallel region after the parent
    did (GCC bug 52303); backprop makes the child single-threaded."""
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_threadpoolctl_limits_backprop():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        assert bp.get_num_threads() == 1
    assert bp.get_num_threads() >= 1


def test_torch_and_backprop_share_a_process():
    torch = pytest.importorskip("torch")
    net = make_net([8, 4], "softmax", "cross_entropy", dtype="float32")
    x = torch.randn(16, 8).numpy()
    assert np.isfinite(net.train_step(x, np.zeros(16, dtype=int)))
    assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).sum().item() == 8


def test_scikit_learn_openmp_and_backprop_share_a_process():
    """scikit-learn's own OpenMP code (histogram gradient boosting) and backprop's run in
    one process without a duplicate-runtime abort, in either order."""
    ensemble = pytest.importorskip("sklearn.ensemble")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 8)), rng.integers(0, 2, 200)
    net = make_net([8, 16, 2], ["relu", "softmax"], "cross_entropy", dtype="float32")
    first = net.train_step(X, y)
    model = ensemble.HistGradientBoostingClassifier(max_iter=5).fit(X, y)
    assert model.score(X, y) > 0.5
    assert net.train_step(X, y) < first
