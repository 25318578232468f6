"""A careful hand-written NumPy training step: the baseline any library must beat.

What a skilled user would write with NumPy alone: every buffer is allocated once, for the
batch size, and every product writes into its buffer with ``out=``; softmax and
cross-entropy are fused the usual way (dZ = (p - onehot) / B); no gradient is computed for
the network's input.  Each layer has ``forward(x) -> y`` and ``backward(dy) -> dx`` (dx is
None for the first layer) and lists its (parameter, gradient) pairs for the SGD update.
"""
import numpy as np

from configs import EPS, MOMENTUM, Activation, BatchNorm, Dense, Residual


def _activate(name, z, out):
    """out = name(z), element-wise; out may be z."""
    if name == "relu":
        np.maximum(z, 0, out=out)
    elif name == "sigmoid":
        np.negative(z, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    elif name == "tanh":
        np.tanh(z, out=out)
    elif name == "identity":
        if out is not z:
            np.copyto(out, z)
    else:
        raise ValueError(f"numpy_reference: unsupported activation {name!r}")


def _activation_grad(name, y, dy, scratch, out):
    """out = dy * name'(z), from the activation's output y = name(z); scratch is (B, n)."""
    if name == "relu":
        np.greater(y, 0, out=scratch)
    elif name == "sigmoid":                         # s' = s (1 - s)
        np.subtract(1, y, out=scratch)
        scratch *= y
    elif name == "tanh":                            # tanh' = 1 - t^2
        np.multiply(y, y, out=scratch)
        np.subtract(1, scratch, out=scratch)
    elif name == "identity":
        np.copyto(out, dy)
        return out
    else:
        raise ValueError(f"numpy_reference: unsupported activation {name!r}")
    np.multiply(dy, scratch, out=out)
    return out


class DenseLayer:
    """y = activation(x @ W.T + b); "softmax" before a cross-entropy loss is left to the loss."""

    def __init__(self, spec, weight, bias, batch, needs_input_grad):
        self.activation = spec.activation
        self.W, self.b = weight.astype(np.float32), bias.astype(np.float32)
        self.dW, self.db = np.empty_like(self.W), np.empty_like(self.b)
        self.out = np.empty((batch, spec.out_features), np.float32)
        self.dz = np.empty_like(self.out)
        self.scratch = np.empty_like(self.out)
        self.dx = np.empty((batch, spec.in_features), np.float32) if needs_input_grad else None

    def forward(self, x):
        self.x = x
        np.matmul(x, self.W.T, out=self.out)
        self.out += self.b
        _activate(self.activation, self.out, self.out)
        return self.out

    def backward(self, dy):
        if self.activation == "identity":
            dz = dy
        else:
            dz = _activation_grad(self.activation, self.out, dy, self.scratch, self.dz)
        np.matmul(dz.T, self.x, out=self.dW)
        np.sum(dz, axis=0, out=self.db)
        if self.dx is None:
            return None
        return np.matmul(dz, self.W, out=self.dx)

    def parameters(self):
        return [(self.W, self.dW), (self.b, self.db)]


class BatchNormLayer:
    """torch.nn.BatchNorm1d in train mode: y = gamma * xhat + beta, per feature.

    Forward, over the B rows of each feature: mu = sum(x) / B, v = sum((x - mu)^2) / B
    (biased), s = sqrt(v + eps), xhat = (x - mu) / s.  The running statistics move by
    momentum m towards mu and the unbiased variance v * B / (B - 1), as torch does.

    Backward.  With g = dL/dxhat = dy * gamma, the chain rule through xhat_i = (x_i - mu)/s:
        dxhat_i/dx_j = (delta_ij - 1/B) / s - (x_i - mu) / s^2 * ds/dx_j
        ds/dx_j = (1 / (2 s)) * dv/dx_j = (1 / (2 s)) * 2 (x_j - mu) / B = xhat_j / B
    (the term of dv/dx_j through mu is -2/B * sum_i (x_i - mu) = 0).  So
        dxhat_i/dx_j = (delta_ij - 1/B - xhat_i xhat_j / B) / s
        dL/dx_j = sum_i g_i dxhat_i/dx_j = (B g_j - sum_i g_i - xhat_j sum_i g_i xhat_i) / (B s)
    and since sum_i g_i = gamma * dbeta and sum_i g_i xhat_i = gamma * dgamma, where
        dbeta = sum_i dy_i,   dgamma = sum_i dy_i xhat_i,
    the input gradient is  dx = gamma / (B s) * (B dy - dbeta - xhat * dgamma).
    """

    def __init__(self, spec, batch):
        n = spec.num_features
        self.gamma, self.beta = np.ones(n, np.float32), np.zeros(n, np.float32)
        self.dgamma, self.dbeta = np.empty_like(self.gamma), np.empty_like(self.beta)
        self.running_mean, self.running_var = np.zeros(n, np.float32), np.ones(n, np.float32)
        self.xhat = np.empty((batch, n), np.float32)
        self.out = np.empty_like(self.xhat)
        self.dx = np.empty_like(self.xhat)
        self.inv_std = np.empty(n, np.float32)

    def forward(self, x):
        rows = x.shape[0]
        mean = x.mean(axis=0)
        np.subtract(x, mean, out=self.xhat)                 # x - mu
        np.multiply(self.xhat, self.xhat, out=self.out)     # (x - mu)^2, out as scratch
        var = self.out.mean(axis=0)
        np.sqrt(var + EPS, out=self.inv_std)
        np.reciprocal(self.inv_std, out=self.inv_std)
        self.xhat *= self.inv_std
        np.multiply(self.xhat, self.gamma, out=self.out)
        self.out += self.beta
        self.running_mean *= 1 - MOMENTUM
        self.running_mean += MOMENTUM * mean
        self.running_var *= 1 - MOMENTUM
        self.running_var += (MOMENTUM * rows / (rows - 1)) * var
        return self.out

    def backward(self, dy):
        rows = dy.shape[0]
        np.sum(dy, axis=0, out=self.dbeta)
        np.multiply(dy, self.xhat, out=self.dx)             # dx as scratch
        np.sum(self.dx, axis=0, out=self.dgamma)
        # dx = gamma s^-1 (dy - (dbeta + xhat dgamma) / B), in place
        np.multiply(self.xhat, self.dgamma / rows, out=self.dx)
        self.dx += self.dbeta / rows
        np.subtract(dy, self.dx, out=self.dx)
        self.dx *= self.gamma * self.inv_std
        return self.dx

    def parameters(self):
        return [(self.gamma, self.dgamma), (self.beta, self.dbeta)]


class ActivationLayer:
    def __init__(self, spec, batch, n):
        self.name = spec.name
        self.out = np.empty((batch, n), np.float32)
        self.scratch, self.dx = np.empty_like(self.out), np.empty_like(self.out)

    def forward(self, x):
        _activate(self.name, x, self.out)
        return self.out

    def backward(self, dy):
        return _activation_grad(self.name, self.out, dy, self.scratch, self.dx)

    def parameters(self):
        return []


class ResidualLayer:
    """y = x + f(x), so dL/dx = dy + f'(x)^T dy."""

    def __init__(self, layers, batch, n):
        self.layers = layers
        self.out = np.empty((batch, n), np.float32)
        self.dx = np.empty_like(self.out)

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer.forward(h)
        return np.add(x, h, out=self.out)

    def backward(self, dy):
        d = dy
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return np.add(dy, d, out=self.dx)

    def parameters(self):
        return [pair for layer in self.layers for pair in layer.parameters()]


class NumpyNetwork:
    """The network of a benchmark config, trained by plain SGD in float32.

    Parameters
    ----------
    config : configs.Config
    weights : list of (W, b)
        Initial weights of every Dense layer in forward order, W of shape (out, in).
    """

    def __init__(self, config, weights):
        self.config = config
        weights = iter(weights)
        self.layers = self._build(config.layers, config.batch, weights, config.n_inputs, first=True)
        if config.classifier:   # the loss below applies the softmax
            self.layers[-1].activation = "identity"
        self.pairs = [pair for layer in self.layers for pair in layer.parameters()]
        self.probs = np.empty((config.batch, config.n_outputs), np.float32)
        self.delta = np.empty_like(self.probs)

    def _build(self, specs, batch, weights, width, first):
        layers = []
        for spec in specs:
            if isinstance(spec, Dense):
                layers.append(DenseLayer(spec, *next(weights), batch, needs_input_grad=not first))
                width = spec.out_features
            elif isinstance(spec, BatchNorm):
                layers.append(BatchNormLayer(spec, batch))
            elif isinstance(spec, Activation):
                layers.append(ActivationLayer(spec, batch, width))
            elif isinstance(spec, Residual):
                inner = self._build(spec.layers, batch, weights, width, first=False)
                layers.append(ResidualLayer(inner, batch, width))
            else:
                raise TypeError(f"numpy_reference: unknown layer spec {spec!r}")
            first = False
        return layers

    def compute_gradients(self, x, y):
        """Forward, loss and backward on one batch: fills every gradient, returns the loss."""
        h = x
        for layer in self.layers:
            h = layer.forward(h)
        loss = self._loss_and_delta(h, y)
        d = self.delta
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return loss

    def train_step(self, x, y):
        """`compute_gradients` and the SGD update on one batch; returns the loss."""
        loss = self.compute_gradients(x, y)
        lr = self.config.lr
        for param, grad in self.pairs:
            grad *= lr
            param -= grad
        return loss

    def _loss_and_delta(self, out, y):
        """The mean loss, and its gradient w.r.t. `out` written to self.delta."""
        rows, p, d = out.shape[0], self.probs, self.delta
        if self.config.classifier:           # out: logits; softmax shifted by the row max
            np.subtract(out, out.max(axis=1, keepdims=True), out=p)
            np.exp(p, out=p)
            p /= p.sum(axis=1, keepdims=True)
            picked = np.arange(rows), y
            loss = -np.log(p[picked] + 1e-30).mean()
            np.copyto(d, p)
            d[picked] -= 1                   # d(mean CE)/dz = (p - onehot) / B
            d /= rows
        else:                                # mse on the output activation's values
            np.subtract(out, y, out=d)
            loss = np.mean(d * d)
            d *= 2 / d.size
        return float(loss)
