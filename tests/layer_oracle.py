"""Independent references for the layer tests: the dropout mask written from its
specification in NumPy, and a PyTorch twin of any backprop network.

The mask of Dropout layer number `layer` (its place in the network's layers listed depth
first, a Residual before the layers inside it) in train-mode pass number `n` (counting
from 1) keeps element (row, col) when

    key  = mix64(mix64(seed) ^ mix64(layer + 1))
    pass = mix64(key + n * 0x9E3779B97F4A7C15)
    rowk = low 32 bits of mix64(pass ^ (row_offset + row))
    keep = mix32(rowk + col * 0x9E3779B9 mod 2^32) >= floor(p * 2^32)

with mix64 SplitMix64's finaliser and mix32 a two-multiply 32-bit finaliser.
"""
import numpy as np

import backprop as bp
from backprop.plan import flatten

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def mix64(z):
    z = np.uint64(z)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix32(x):
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
        x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def dropout_mask(seed, layer, n_pass, rows, cols, p, row_offset=0):
    """The keep mask (bool, rows x cols) of the specification above."""
    key = mix64(int(mix64(seed)) ^ int(mix64(layer + 1)))
    with np.errstate(over="ignore"):
        pass_key = mix64(key + np.uint64(n_pass) * np.uint64(0x9E3779B97F4A7C15))
        row_keys = np.array([int(mix64(int(pass_key) ^ (row_offset + i))) & M32
                             for i in range(rows)], dtype=np.uint64)
        h = (row_keys[:, None] + np.arange(cols, dtype=np.uint64)[None, :]
             * np.uint64(0x9E3779B9)) & np.uint64(M32)
    return mix32(h.astype(np.uint32)).astype(np.uint64) >= np.uint64(int(p * 2 ** 32))


def torch_twin(net):
    """A torch.nn.Module computing what `net` computes, with copies of its parameters and
    buffers, in float64.  Its forward returns the LOGITS of a softmax or sigmoid output
    (the pre-activation the built-in losses use) and counts train-mode passes like the
    network, so its Dropout layers draw the network's masks."""
    import torch

    layer_index = {id(layer): i for i, layer in enumerate(flatten(net.layers))}
    passes = {"n": net._engine.passes}
    pairs, buffers = [], []      # (name, backprop array, torch tensor)

    def activation(name):
        return {"identity": torch.nn.Identity(), "sigmoid": torch.nn.Sigmoid(),
                "tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(),
                "leaky_relu": torch.nn.LeakyReLU(0.01), "elu": torch.nn.ELU(1.0),
                "gelu": torch.nn.GELU(), "softplus": torch.nn.Softplus(1.0, 20.0),
                "softmax": torch.nn.Softmax(dim=1)}[name]

    class Masked(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.p, self.index = layer.p, layer_index[id(layer)]

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            keep = dropout_mask(net._key_seed, self.index, passes["n"], x.shape[0], x.shape[1],
                                self.p)
            return x * torch.from_numpy(keep.astype(np.float64)) / (1 - self.p)

    class Sum(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.f = torch.nn.Sequential(*inner)

        def forward(self, x):
            return x + self.f(x)

    def convert(layer):
        t = lambda a: torch.nn.Parameter(torch.tensor(np.array(a, dtype=np.float64)))
        if isinstance(layer, bp.Dense):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias,
                                     dtype=torch.float64)
            linear.weight = t(layer.weight)
            pairs.append((f"{layer!r}.weight", layer, "weight", linear.weight))
            if layer.use_bias:
                linear.bias = t(layer.bias)
                pairs.append((f"{layer!r}.bias", layer, "bias", linear.bias))
            return [linear, activation(layer.activation)]
        if isinstance(layer, bp.BatchNorm):
            bn = torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                      affine=layer.affine, dtype=torch.float64)
            if layer.affine:
                bn.weight, bn.bias = t(layer.weight), t(layer.bias)
                pairs.append((f"{layer!r}.weight", layer, "weight", bn.weight))
                pairs.append((f"{layer!r}.bias", layer, "bias", bn.bias))
            bn.running_mean.copy_(torch.tensor(np.array(layer.running_mean, dtype=np.float64)))
            bn.running_var.copy_(torch.tensor(np.array(layer.running_var, dtype=np.float64)))
            buffers.append((f"{layer!r}.running_mean", layer, "running_mean", bn.running_mean))
            buffers.append((f"{layer!r}.running_var", layer, "running_var", bn.running_var))
            return [bn]
        if isinstance(layer, bp.LayerNorm):
            ln = torch.nn.LayerNorm(layer.normalized_shape, eps=layer.eps,
                                    elementwise_affine=layer.elementwise_affine,
                                    dtype=torch.float64)
            if layer.elementwise_affine:
                ln.weight, ln.bias = t(layer.weight), t(layer.bias)
                pairs.append((f"{layer!r}.weight", layer, "weight", ln.weight))
                pairs.append((f"{layer!r}.bias", layer, "bias", ln.bias))
            return [ln]
        if isinstance(layer, bp.Dropout):
            return [Masked(layer)]
        if isinstance(layer, bp.Activation):
            return [activation(layer.name)]
        if isinstance(layer, bp.Residual):
            return [Sum([m for inner in layer.layers for m in convert(inner)])]
        raise TypeError(layer)

    modules = [m for layer in net.layers for m in convert(layer)]
    if net.loss in ("cross_entropy", "binary_cross_entropy"):
        assert isinstance(modules[-1], (torch.nn.Softmax, torch.nn.Sigmoid))
        modules = modules[:-1]               # the losses take logits

    class Twin(torch.nn.Sequential):
        def forward(self, x):
            if self.training:
                passes["n"] += 1
            return super().forward(x)

    twin = Twin(*modules)
    twin.train(net.training)
    twin.passes = passes
    twin.pairs, twin.buffer_pairs = pairs, buffers
    return twin


def torch_loss(net, logits, y):
    import torch
    if net.loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(logits, torch.as_tensor(y))
    if net.loss == "binary_cross_entropy":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(y))
    return torch.nn.functional.mse_loss(logits, torch.as_tensor(y))


def torch_optimizer(net, twin):
    """torch.optim's version of the network's optimizer, over the twin's parameters in
    the order of the network's flat buffer."""
    import torch
    hp = dict(net.optimizer.hyperparameters())
    cls = getattr(torch.optim, type(net.optimizer).__name__)
    return cls(twin.parameters(), **hp)


def non_trivial(net, seed):
    """Give `net` parameters and running statistics a default initialisation would not:
    biases and affine weights away from 0 and 1, running statistics away from 0 and 1,
    so a converter that dropped one of them would show.  Returns the network."""
    rng = np.random.default_rng(seed)
    for layer in flatten(net.layers):
        for name, shape, weight in layer.parameters():
            if name.startswith("bias"):          # bias, bias_ih_l0, ...
                getattr(layer, name)[...] = rng.normal(0, 0.3, shape)
            elif not weight:                 # a normalisation's scale
                getattr(layer, name)[...] = rng.uniform(0.5, 1.5, shape)
        if isinstance(layer, bp.BatchNorm):
            layer.running_mean[...] = rng.normal(0, 0.5, layer.num_features)
            layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)
    return net
