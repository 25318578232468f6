"""The layer kinds: one class each, declaring what its compiled kernels need (see
``base.py`` for the declaration and ``register``)."""
from backprop.layers.base import LAYERS, Layer, Param, from_config, register, to_config
from backprop.layers.convolution import Conv1d, Conv2d
from backprop.layers.dense import Dense
from backprop.layers.elementwise import Activation, Dropout
from backprop.layers.embedding import Embedding
from backprop.layers.normalization import BatchNorm, LayerNorm
from backprop.layers.recurrent import GRU, LSTM, RNN, LastStep
from backprop.layers.pooling import (AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, GlobalAvgPool,
                                     MaxPool1d, MaxPool2d)
from backprop.layers.reshape import Flatten
from backprop.layers.residual import Residual

# PyTorch's names for the one BatchNorm, whatever the sample's shape.
BatchNorm1d = BatchNorm2d = BatchNorm

__all__ = ["LAYERS", "Activation", "AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d", "BatchNorm",
           "BatchNorm1d", "BatchNorm2d", "Conv1d", "Conv2d", "Dense", "Dropout", "Embedding",
           "Flatten", "GRU", "GlobalAvgPool", "LSTM", "LastStep", "Layer", "LayerNorm",
           "MaxPool1d", "MaxPool2d", "Param", "RNN", "Residual", "from_config", "register",
           "to_config"]
