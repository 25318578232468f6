"""Embedding (kernels: _embedding.pxd)."""
import numpy as np

from backprop.layers.base import Layer, Param, copy_to_torch, describe, positive_int, register, unsupported


@register
class Embedding(Layer):
    """A table of vectors looked up by integer id, as ``torch.nn.Embedding``: samples of
    ids of shape (length,) become (length, embedding_dim).  Only a network's first layer
    (its input is the ids; give ``Network(..., input_shape=(length,))``).  An id outside
    [0, num_embeddings) is a ValueError naming it, raised before any kernel runs.

    Parameters
    ----------
    num_embeddings : int, the ids' range
    embedding_dim : int
    padding_idx : int or None
        This id's vector starts at zero and gets no gradient (PyTorch's padding_idx; a
        negative value counts from the end).

    Attributes (once part of a Network): ``weight`` of shape (num_embeddings,
    embedding_dim), drawn from N(0, 1) as PyTorch does; ``weight_grad``.
    """

    kernel = "embedding"
    kernel_params = ("weight",)
    takes_ids = True
    output_layout = "first"
    torch_names = ("Embedding",)

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None):
        self.num_embeddings = positive_int("Embedding", "num_embeddings", num_embeddings)
        self.embedding_dim = positive_int("Embedding", "embedding_dim", embedding_dim)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"Embedding: padding_idx must be None or an id in "
                                 f"[-{self.num_embeddings}, {self.num_embeddings}), got "
                                 f"{padding_idx!r}")
            padding_idx = int(padding_idx) % self.num_embeddings
        self.padding_idx = padding_idx
        self.weight = self.weight_grad = None
        self._freeze()

    def output_shape(self, shape):
        if len(shape) != 1:
            raise ValueError(f"takes samples of ids of shape (length,), but its input is "
                             f"{describe(shape)}")
        return shape + (self.embedding_dim,)

    def parameters(self):
        return [Param("weight", (self.num_embeddings, self.embedding_dim), True)]

    def initial_parameters(self, rng):
        weight = rng.normal(0.0, 1.0, size=(self.num_embeddings, self.embedding_dim))
        if self.padding_idx is not None:
            weight[self.padding_idx] = 0.0
        return {"weight": weight}

    def without_gradient(self):
        return {} if self.padding_idx is None else {"weight": self.padding_idx}

    def record(self, x):
        return {"padding_idx": -1 if self.padding_idx is None else self.padding_idx}

    def config(self):
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def to_torch(self, nn, dtype, shape):
        return [copy_to_torch(nn.Embedding(self.num_embeddings, self.embedding_dim,
                                           padding_idx=self.padding_idx, dtype=dtype), self)]

    @classmethod
    def from_torch(cls, module, path):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise unsupported(path, module, "is not supported: backprop's Embedding has no "
                              "max_norm, scale_grad_by_freq or sparse gradients")
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx)

    def to_onnx(self, graph, x, here, shape):
        return graph.node("Gather", [graph.tensor(f"{here}.weight", self.weight), x],
                          f"{here}.gather", axis=0)
