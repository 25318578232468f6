"""A careful hand-written NumPy training step: the baseline any library must beat.

Buffers are allocated once; every product writes into them with ``out=``; softmax and
cross-entropy are fused the usual way (delta = p - onehot).  It is what a skilled user
would write with NumPy alone.
"""
import numpy as np


def _act(name, z, out):
    if name == "relu":
        np.maximum(z, 0, out=out)
    elif name == "sigmoid":
        np.negative(z, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    else:
        raise ValueError(name)


class NumpyMLP:
    def __init__(self, config, seed=0):
        rng = np.random.default_rng(seed)
        s, b = config.sizes, config.batch
        self.c = config
        self.W = [(rng.normal(size=(o, i)) * np.sqrt(2 / i)).astype(np.float32) for i, o in zip(s, s[1:])]
        self.b = [np.zeros(o, np.float32) for o in s[1:]]
        self.a = [np.empty((b, o), np.float32) for o in s[1:]]
        self.d = [np.empty((b, o), np.float32) for o in s[1:]]
        self.dW = [np.empty_like(w) for w in self.W]
        self.mask = [np.empty((b, o), np.float32) for o in s[1:]]

    def train_step(self, x, y):
        c, n = self.c, len(self.W)
        h = x
        for i in range(n):
            np.matmul(h, self.W[i].T, out=self.a[i])
            self.a[i] += self.b[i]
            if i < n - 1:
                _act(c.hidden, self.a[i], self.a[i])
            h = self.a[i]
        out, d = self.a[-1], self.d[-1]
        rows = x.shape[0]
        if c.loss == "cross_entropy":
            out -= out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
            loss = -np.log(out[np.arange(rows), y] + 1e-30).mean()
            np.copyto(d, out)
            d[np.arange(rows), y] -= 1
            d /= rows
        else:
            _act(c.output, out, out)
            np.subtract(out, y, out=d)
            loss = float((d * d).mean())
            d *= 2 / d.size
            d *= out * (1 - out)
        for i in reversed(range(n)):
            inp = self.a[i - 1] if i > 0 else x
            np.matmul(self.d[i].T, inp, out=self.dW[i])
            db = self.d[i].sum(axis=0)
            if i > 0:
                np.matmul(self.d[i], self.W[i], out=self.d[i - 1])
                if c.hidden == "relu":
                    np.greater(self.a[i - 1], 0, out=self.mask[i - 1])
                    self.d[i - 1] *= self.mask[i - 1]
                else:
                    self.d[i - 1] *= self.a[i - 1] * (1 - self.a[i - 1])
            self.W[i] -= c.lr * self.dW[i]
            self.b[i] -= c.lr * db
        return float(loss)
