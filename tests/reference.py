"""A readable float64 NumPy implementation of everything the core computes: the test oracle.

Written from the formulas, independently of backprop's kernels: a bug would have to be
made twice, the same way, to pass unnoticed.
"""
import math

import numpy as np

_erf = np.vectorize(math.erf)


def activate(z, name):
    if name == "identity":
        return z
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":
        return np.where(z > 0, z, 0.01 * z)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if name == "gelu":
        return 0.5 * z * (1 + _erf(z / np.sqrt(2)))
    if name == "softplus":
        return np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(name)


def activation_vjp(z, a, g, name):
    """dL/dz from dL/da = g, written from the derivative of each function of z."""
    if name == "identity":
        return g
    if name == "sigmoid":
        return g * a * (1 - a)
    if name == "tanh":
        return g * (1 - np.tanh(z) ** 2)
    if name == "relu":
        return g * (z > 0)
    if name == "leaky_relu":
        return g * np.where(z > 0, 1.0, 0.01)
    if name == "elu":
        return g * np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))
    if name == "gelu":
        phi = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
        return g * (0.5 * (1 + _erf(z / np.sqrt(2))) + z * phi)
    if name == "softplus":
        return g * np.where(z > 20, 1.0, 1 / (1 + np.exp(-z)))
    if name == "softmax":
        # Jacobian diag(a) - a a^T applied row by row
        return a * g - a * (a * g).sum(axis=1, keepdims=True)
    raise ValueError(name)


def loss_and_grad(z, a, y, loss):
    """(loss, dL/dz of the output layer) with PyTorch's mean reductions."""
    if loss == "mse":
        n = a.size
        return ((a - y) ** 2).sum() / n, None, 2 * (a - y) / n   # dL/da
    if loss == "binary_cross_entropy":
        n = z.size
        value = (-y * np.log(activate(z, "sigmoid")) - (1 - y) * np.log(1 - activate(z, "sigmoid"))).sum() / n
        return value, (activate(z, "sigmoid") - y) / n, None
    if loss == "cross_entropy":
        rows = z.shape[0]
        if y.ndim == 1:
            y = np.eye(z.shape[1])[y]
        log_p = z - z.max(axis=1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        value = -(y * log_p).sum() / rows
        return value, (np.exp(log_p) * y.sum(axis=1, keepdims=True) - y) / rows, None
    raise ValueError(loss)


class MLP:
    """Forward and backward of a stack of dense layers, kept as plain lists of arrays."""

    def __init__(self, weights, biases, activations):
        self.W = [np.array(w, dtype=np.float64) for w in weights]
        self.b = [None if b is None else np.array(b, dtype=np.float64) for b in biases]
        self.act = list(activations)

    @classmethod
    def of(cls, net):
        return cls([l.weight for l in net.layers], [l.bias for l in net.layers],
                   [l.activation for l in net.layers])

    def forward(self, x):
        self.x = np.asarray(x, dtype=np.float64)
        self.z, self.a = [], []
        h = self.x
        for W, b, act in zip(self.W, self.b, self.act):
            z = h @ W.T + (0 if b is None else b)
            h = activate(z, act)
            self.z.append(z)
            self.a.append(h)
        return h

    def backward(self, y=None, loss=None, grad_output=None):
        """Returns (loss or None, [dW], [db], dx)."""
        value = None
        if grad_output is not None:
            dz = activation_vjp(self.z[-1], self.a[-1], grad_output, self.act[-1])
        else:
            value, dz, da = loss_and_grad(self.z[-1], self.a[-1], y, loss)
            if dz is None:
                dz = activation_vjp(self.z[-1], self.a[-1], da, self.act[-1])
        dW, db = [None] * len(self.W), [None] * len(self.W)
        for i in reversed(range(len(self.W))):
            inp = self.a[i - 1] if i > 0 else self.x
            dW[i] = dz.T @ inp
            db[i] = None if self.b[i] is None else dz.sum(axis=0)
            da = dz @ self.W[i]
            if i > 0:
                dz = activation_vjp(self.z[i - 1], self.a[i - 1], da, self.act[i - 1])
        return value, dW, db, da

    def flat_grads(self, dW, db):
        return np.concatenate([np.concatenate([w.ravel()] + ([] if b is None else [b]))
                               for w, b in zip(dW, db)])


# ---- optimizers: one update of flat parameters p from gradient g, state in a dict

def sgd(p, g, s, t, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    g = g + weight_decay * p
    if momentum:
        s["buf"] = g.copy() if t == 1 else momentum * s["buf"] + (1 - dampening) * g
        g = g + momentum * s["buf"] if nesterov else s["buf"]
    return p - lr * g


def adam(p, g, s, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         decoupled=False):
    b1, b2 = betas
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
    v = s["v"]
    if amsgrad:
        s["vmax"] = np.maximum(s.get("vmax", 0), s["v"])
        v = s["vmax"]
    # The paper's bias-corrected estimates; PyTorch folds the corrections into the step
    # size, which is the same number up to rounding.
    m_hat = s["m"] / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)


def adamw(p, g, s, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
    return adam(p, g, s, t, lr, betas, eps, weight_decay, amsgrad, decoupled=True)


def rmsprop(p, g, s, t, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False):
    g = g + weight_decay * p
    s["sq"] = alpha * s.get("sq", 0) + (1 - alpha) * g * g
    if centered:
        s["avg"] = alpha * s.get("avg", 0) + (1 - alpha) * g
        denom = np.sqrt(s["sq"] - s["avg"] ** 2) + eps
    else:
        denom = np.sqrt(s["sq"]) + eps
    if momentum > 0:
        s["buf"] = momentum * s.get("buf", 0) + g / denom
        return p - lr * s["buf"]
    return p - lr * g / denom


def adagrad(p, g, s, t, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10):
    g = g + weight_decay * p
    s["sum"] = s.get("sum", initial_accumulator_value) + g * g
    return p - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s["sum"]) + eps)


UPDATES = {"SGD": sgd, "Adam": adam, "AdamW": adamw, "RMSprop": rmsprop, "Adagrad": adagrad}
