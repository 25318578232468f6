"""A training step allocates nothing once the workspace is warm."""
import tracemalloc

import numpy as np

import backprop as bp
from conftest import make_net


def traced_growth(step, n):
    for _ in range(20):       # warm-up: workspace, first-call caches
        step()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            step()
        return tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()


def test_train_step_does_not_grow_memory():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(1000, 64)).astype(np.float32), rng.integers(0, 10, 1000)
    net = make_net([64, 128, 10], ["relu", "softmax"], "cross_entropy", dtype="float32",
                   optimizer=bp.Adam())
    rows = np.arange(32)
    # NumPy reports its allocations to tracemalloc, so an array made per step would show
    # as ~kilobytes of growth per 100 steps; a few hundred bytes is interpreter noise.
    for step in (lambda: net.train_step(X[:32], y[:32]),
                 lambda: net.train_step(X, y, rows=rows)):
        assert traced_growth(step, 500) < 1024
        assert traced_growth(step, 2000) < 1024     # and it does not scale with steps


def test_every_layer_type_trains_without_allocating():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(1000, 64)).astype(np.float32), rng.integers(0, 10, 1000)
    net = bp.Network([bp.Dense(64, 128, bias=False), bp.BatchNorm(128), bp.Activation("relu"),
                      bp.Dropout(0.2),
                      bp.Residual(bp.Dense(128, 128, "gelu"), bp.LayerNorm(128)),
                      bp.Dense(128, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(), seed=0)
    rows = np.arange(32)
    for step in (lambda: net.train_step(X[:32], y[:32]),
                 lambda: net.train_step(X, y, rows=rows, clip_grad_norm=1.0),
                 lambda: net.compute_gradients(X, y, rows=rows) and net.step() or net.zero_grad()):
        assert traced_growth(step, 500) < 1024


def test_convolutional_and_embedding_networks_train_without_allocating():
    """Convolutions (im2col scratch, several chunks), pooling, BatchNorm on images,
    residual blocks, relayouts, Dropout, and an Embedding's ids."""
    from cnn_oracle import embedding_net, residual_cnn, small_cnn
    rng = np.random.default_rng(0)
    images = rng.normal(size=(200, 3, 9, 7)).astype(np.float32)
    small = rng.normal(size=(200, 1, 8, 7)).astype(np.float32)
    ids, labels = rng.integers(0, 20, (200, 6)), rng.integers(0, 3, 200)
    rows = np.arange(32)
    cnn, dropout, embedding = (residual_cnn(dtype="float32"), small_cnn(dtype="float32"),
                               embedding_net(dtype="float32"))
    for step in (lambda: cnn.train_step(images[:32], labels[:32]),
                 lambda: cnn.train_step(images, labels, rows=rows, clip_grad_norm=1.0, l2=1e-4),
                 lambda: dropout.train_step(small, labels, rows=rows),
                 lambda: embedding.train_step(ids[:32], labels[:32]),
                 lambda: embedding.train_step(ids, labels, rows=rows, l2=1e-4)):
        assert traced_growth(step, 100) < 1024     # 100 steps: 11 bytes a step would show


def test_recurrent_networks_train_without_allocating():
    """Every cell, stacked and bidirectional, LastStep, an activation kept apart."""
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(200, 7, 5)).astype(np.float32), rng.integers(0, 3, 200)
    net = bp.Network([bp.GRU(5, 6, num_layers=2, bidirectional=True), bp.Activation("tanh"),
                      bp.LSTM(12, 6), bp.RNN(6, 4, nonlinearity="relu", bidirectional=True),
                      bp.LastStep(), bp.Dense(8, 3, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(), seed=0, input_shape=(7, 5))
    rows = np.arange(32)
    for step in (lambda: net.train_step(x[:32], labels[:32]),
                 lambda: net.train_step(x, labels, rows=rows, clip_grad_norm=1.0, l2=1e-4)):
        assert traced_growth(step, 100) < 1024


def test_bfloat16_products_train_without_allocating():
    """bfloat16 products pack into the same scratch (sized for either precision), also
    when the precision changes between steps."""
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(200, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, 200)
    net = bp.Network([bp.Conv2d(2, 8, 3, padding=1, activation="relu"), bp.Flatten(),
                      bp.Dense(512, 40, "relu"), bp.Dense(40, 3, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(), seed=0, input_shape=(2, 8, 8),
                     precision="bfloat16")
    sequences = rng.normal(size=(200, 7, 5)).astype(np.float32)
    lstm = bp.Network([bp.LSTM(5, 16), bp.LastStep(), bp.Dense(16, 3, "softmax")],
                      loss="cross_entropy", seed=0, input_shape=(7, 5), precision="bfloat16")
    rows = np.arange(32)

    def switching():
        net.precision = "float32" if net.precision == "bfloat16" else "bfloat16"
        net.train_step(x[:32], labels[:32])

    for step in (lambda: net.train_step(x, labels, rows=rows),
                 lambda: lstm.train_step(sequences[:32], labels[:32]), switching):
        assert traced_growth(step, 100) < 1024
