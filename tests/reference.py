"""A readable float64 NumPy implementation of everything the core computes: the test oracle.

Written from the formulas, independently of backprop's kernels (nothing here imports
backprop): a bug would have to be made twice, the same way, to pass unnoticed.  Where the
core takes a shortcut (derivatives from saved outputs, p - y for the cross-entropies,
PyTorch's folded bias corrections in Adam), this file takes the textbook road instead.
"""
import math

import numpy as np

_erf = np.vectorize(math.erf)


# ---- activations a = f(z) and the backward map dL/da -> dL/dz

def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def activate(z, name):
    if name == "identity":
        return z
    if name == "sigmoid":
        return sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":                       # PyTorch's default slope 0.01
        return np.where(z > 0, z, 0.01 * z)
    if name == "elu":                              # alpha = 1
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if name == "gelu":                             # exact: z Phi(z)
        return 0.5 * z * (1 + _erf(z / np.sqrt(2)))
    if name == "softplus":                         # log(1 + e^z); z itself above 20
        return np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20))))
    if name == "softmax":                          # row-wise
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(name)


def activation_vjp(z, a, g, name):
    """dL/dz given dL/da = g, from the derivative of each function with respect to z."""
    if name == "identity":
        return g
    if name == "sigmoid":
        return g * sigmoid(z) * (1 - sigmoid(z))
    if name == "tanh":
        return g / np.cosh(z) ** 2
    if name == "relu":
        return g * (z > 0)
    if name == "leaky_relu":
        return g * np.where(z > 0, 1.0, 0.01)
    if name == "elu":
        return g * np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))
    if name == "gelu":                             # Phi(z) + z phi(z)
        phi = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
        return g * (0.5 * (1 + _erf(z / np.sqrt(2))) + z * phi)
    if name == "softplus":                         # the derivative of softplus is sigmoid
        return g * np.where(z > 20, 1.0, sigmoid(z))
    if name == "softmax":
        # The Jacobian da_i/dz_j = a_i (delta_ij - a_j), built and applied row by row.
        return np.stack([(np.diag(ar) - np.outer(ar, ar)) @ gr for ar, gr in zip(a, g)])
    raise ValueError(name)


# ---- losses, with PyTorch's mean reductions

def loss_value(a, y, loss):
    """The loss of the output probabilities/values `a` against targets `y`."""
    if loss == "mse":                              # mean over every element
        return np.mean((a - y) ** 2)
    if loss == "binary_cross_entropy":             # mean over every element
        return np.mean(-y * np.log(a) - (1 - y) * np.log(1 - a))
    if loss == "cross_entropy":                    # mean over rows; labels or probability rows
        if y.ndim == 1:
            y = np.eye(a.shape[1])[y]
        return -np.sum(y * np.log(a)) / a.shape[0]
    raise ValueError(loss)


def loss_grad(a, y, loss):
    """dL/da, differentiated by hand from loss_value."""
    if loss == "mse":
        return 2 * (a - y) / a.size
    if loss == "binary_cross_entropy":
        return (-y / a + (1 - y) / (1 - a)) / a.size
    if loss == "cross_entropy":
        if y.ndim == 1:
            y = np.eye(a.shape[1])[y]
        return -y / a / a.shape[0]
    raise ValueError(loss)


# ---- a stack of dense layers

class MLP:
    """Forward and backward of a stack of dense layers a = f(x W^T + b), kept as plain
    lists of arrays."""

    def __init__(self, weights, biases, activations):
        self.W = [np.array(w, dtype=np.float64) for w in weights]
        self.b = [None if b is None else np.array(b, dtype=np.float64) for b in biases]
        self.act = list(activations)

    @classmethod
    def of(cls, net):
        """The reference twin of a backprop Network (read through its public views)."""
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

    def loss(self, y, loss):
        return loss_value(self.a[-1], np.asarray(y), loss)

    def backward(self, y=None, loss=None, grad_output=None):
        """Gradients of the loss against y (or of sum(grad_output * output)) for the last
        forward: returns ([dW], [db], dx)."""
        da = loss_grad(self.a[-1], np.asarray(y), loss) if grad_output is None else grad_output
        dW, db = [None] * len(self.W), [None] * len(self.W)
        for i in reversed(range(len(self.W))):
            dz = activation_vjp(self.z[i], self.a[i], da, self.act[i])
            inp = self.a[i - 1] if i > 0 else self.x
            dW[i] = dz.T @ inp
            db[i] = None if self.b[i] is None else dz.sum(axis=0)
            da = dz @ self.W[i]
        return dW, db, da

    @staticmethod
    def flat(dW, db):
        """Gradients in the order of Network.params: each layer's weight (row-major),
        then its bias."""
        return np.concatenate([np.concatenate([w.ravel()] + ([] if b is None else [b]))
                               for w, b in zip(dW, db)])


# ---- optimizers: one update of the flat parameters p from the gradient g at step t
# (1-based).  The state dict `s` uses PyTorch's (and backprop's) buffer names.

def sgd(p, g, s, t, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    g = g + weight_decay * p
    if momentum:
        if t == 1:
            s["momentum_buffer"] = g.copy()
        else:
            s["momentum_buffer"] = momentum * s["momentum_buffer"] + (1 - dampening) * g
        g = g + momentum * s["momentum_buffer"] if nesterov else s["momentum_buffer"]
    return p - lr * g


def adam(p, g, s, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         decoupled=False):
    b1, b2 = betas
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    s["exp_avg"] = b1 * s.get("exp_avg", 0) + (1 - b1) * g
    s["exp_avg_sq"] = b2 * s.get("exp_avg_sq", 0) + (1 - b2) * g * g
    v = s["exp_avg_sq"]
    if amsgrad:
        s["max_exp_avg_sq"] = np.maximum(s.get("max_exp_avg_sq", 0), v)
        v = s["max_exp_avg_sq"]
    # The paper's bias-corrected estimates; PyTorch folds the corrections into the step
    # size, which is the same number up to rounding.
    m_hat = s["exp_avg"] / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)


def adamw(p, g, s, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
    return adam(p, g, s, t, lr, betas, eps, weight_decay, amsgrad, decoupled=True)


def rmsprop(p, g, s, t, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
            centered=False):
    g = g + weight_decay * p
    s["square_avg"] = alpha * s.get("square_avg", 0) + (1 - alpha) * g * g
    if centered:   # subtract the squared running mean: a running variance
        s["grad_avg"] = alpha * s.get("grad_avg", 0) + (1 - alpha) * g
        denom = np.sqrt(s["square_avg"] - s["grad_avg"] ** 2) + eps
    else:
        denom = np.sqrt(s["square_avg"]) + eps
    if momentum > 0:
        s["momentum_buffer"] = momentum * s.get("momentum_buffer", 0) + g / denom
        return p - lr * s["momentum_buffer"]
    return p - lr * g / denom


def adagrad(p, g, s, t, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
            eps=1e-10):
    g = g + weight_decay * p
    s["sum"] = s.get("sum", initial_accumulator_value) + g * g
    return p - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s["sum"]) + eps)


UPDATES = {"SGD": sgd, "Adam": adam, "AdamW": adamw, "RMSprop": rmsprop, "Adagrad": adagrad}
