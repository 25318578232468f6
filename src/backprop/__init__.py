"""backprop: train neural networks by backpropagation on the CPU.

A typed Cython + OpenMP core (``backprop._core``) behind a small NumPy API::

    import backprop as bp
    net = bp.Network([bp.Dense(64, 32, "relu"), bp.Dense(32, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), seed=0)
    loss = net.train_step(x, y)
"""
from backprop._core import (ACTIVATIONS, MAX_THREADS, bfloat16_kernel, get_num_threads,
                            openmp_enabled, set_num_threads, simd_kernel)
from backprop import datasets, distributed, ops
from backprop.callbacks import GradientMonitor
from backprop.gradcheck import gradcheck
from backprop.layers import (Activation, AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, BatchNorm,
                             BatchNorm1d, BatchNorm2d, Conv1d, Conv2d, Dense, Dropout, Embedding,
                             Flatten, GlobalAvgPool, GRU, LastStep, LayerNorm, LSTM, MaxPool1d,
                             MaxPool2d, Residual, RNN)
from backprop.losses import LOSSES
from backprop.network import Network
from backprop.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

import os as _os

from backprop import _core
from backprop._threads import set_num_threads   # _core's, recording the request (see there)

if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_core._after_fork_in_child)

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "LOSSES", "MAX_THREADS", "Activation", "Adagrad", "Adam", "AdamW",
           "AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d", "BatchNorm", "BatchNorm1d", "BatchNorm2d",
           "Conv1d", "Conv2d", "Dense", "Dropout", "Embedding", "Flatten", "GRU",
           "GlobalAvgPool", "GradientMonitor", "LSTM", "LastStep", "LayerNorm", "MaxPool1d",
           "MaxPool2d", "Network", "Optimizer", "RMSprop", "RNN", "Residual", "SGD",
           "bfloat16_kernel", "datasets", "distributed", "get_num_threads", "gradcheck", "openmp_enabled", "ops",
           "set_num_threads", "simd_kernel"]
