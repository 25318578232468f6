"""A careful hand-written NumPy training step: the baseline any library must beat.

What a skilled user would write with NumPy alone: every buffer is allocated once, for the
batch size, and every product writes into its buffer with ``out=``; softmax and
cross-entropy are fused the usual way (dZ = (p - onehot) / B); no gradient is computed for
the network's input.  Each layer has ``forward(x) -> y`` and ``backward(dy) -> dx`` (dx is
None for the first layer) and lists its (parameter, gradient) pairs for the SGD update.

Images (NCHW batches, as the other frameworks take them) are handled channels-last inside,
(B, H, W, C): a convolution done as one product (im2col) then gives its output in that
layout directly, with no transpose per layer.  The input is read through a transposed
view, and Flatten writes PyTorch's channel-by-channel order, so the weights and the
parameters' layouts are PyTorch's everywhere.

Sequences (batch-first (B, T, F) batches) are handled time-major inside, (T, B, F): each
step's rows are then one contiguous block, and all steps together one matrix for the
products that need no recurrence (the input projection, dW_ih, dW_hh).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from configs import (EPS, LSTM, MOMENTUM, Activation, BatchNorm, Conv2d, Dense, Flatten,
                     LastStep, MaxPool2d, Residual)


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
        self.activation, dtype = spec.activation, weight.dtype
        self.W, self.b = weight, bias
        self.dW, self.db = np.empty_like(self.W), np.empty_like(self.b)
        self.out = np.empty((batch, spec.out_features), dtype)
        self.dz = np.empty_like(self.out)
        self.scratch = np.empty_like(self.out)
        self.dx = np.empty((batch, spec.in_features), dtype) if needs_input_grad else None

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


def _windows(x, kernel, stride):
    """The (B, Ho, Wo, C, k, k) view of every window of a channels-last x (no copy)."""
    return sliding_window_view(x, (kernel, kernel), axis=(1, 2))[:, ::stride, ::stride]


def _tap(a, i, j, stride, ho, wo):
    """The (B, Ho, Wo, C) view of `a` holding tap (i, j) of every window."""
    return a[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]


class Conv2dLayer:
    """y = activation(conv2d(x, W) + b) on channels-last images, by im2col: a Dense layer
    over the input's windows.

    Forward: the window of each output pixel (its k*k taps of every input channel, in the
    order of W's (C, k, k)) is copied to one row of `cols`, shape (B*Ho*Wo, C*k*k); the
    convolution is then the Dense layer activation(cols . W^T + b), W seen as
    (Cout, C*k*k), whose (B*Ho*Wo, Cout) output is already the channels-last image.
    Backward: the Dense layer gives dW, db and dcols = dZ . W; each row of dcols goes back
    to the input positions it was copied from (col2im: one strided add per tap, k*k in
    all, summing where windows overlap).
    """

    def __init__(self, spec, weight, bias, batch, shape, needs_input_grad):
        (h, w, c), dtype = shape, weight.dtype
        k, s, p = spec.kernel_size, spec.stride, spec.padding
        self.k, self.s, self.p = k, s, p
        self.ho, self.wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        self.shape = (self.ho, self.wo, spec.out_channels)
        self.W = weight                                      # (Cout, C, k, k), PyTorch's
        rows = Dense(c * k * k, spec.out_channels, spec.activation)
        self.dense = DenseLayer(rows, weight.reshape(len(weight), -1), bias,
                                batch * self.ho * self.wo, needs_input_grad)
        # The zero-padded input: its border is written once, here, and stays zero.
        self.padded = np.zeros((batch, h + 2 * p, w + 2 * p, c), dtype) if p else None
        self.cols = np.empty((batch, self.ho, self.wo, c, k, k), dtype)
        self.dx = np.empty((batch, h + 2 * p, w + 2 * p, c), dtype) if needs_input_grad else None

    def forward(self, x):
        p = self.p
        if self.padded is not None:
            self.padded[:, p:-p, p:-p, :] = x
            x = self.padded
        np.copyto(self.cols, _windows(x, self.k, self.s))
        out = self.dense.forward(self.cols.reshape(len(self.dense.out), -1))
        return out.reshape(-1, *self.shape)

    def backward(self, dy):
        dcols = self.dense.backward(dy.reshape(self.dense.out.shape))
        if dcols is None:
            return None
        dcols = dcols.reshape(self.cols.shape)
        self.dx.fill(0)
        for i in range(self.k):
            for j in range(self.k):
                _tap(self.dx, i, j, self.s, self.ho, self.wo)[...] += dcols[..., i, j]
        p = self.p
        return self.dx[:, p:-p, p:-p, :] if p else self.dx

    def parameters(self):
        return [(self.W, self.dense.dW.reshape(self.W.shape)), (self.dense.b, self.dense.db)]


class MaxPool2dLayer:
    """torch.nn.MaxPool2d on channels-last images: each window's taps are copied side by
    side, (B, Ho, Wo, C, k*k), and the max and its first position (argmax) kept.  Backward
    sends each output's gradient to that position, as PyTorch does: with ties only the
    first largest value gets it (after a relu the ties are zeros, whose gradient the relu
    stops anyway)."""

    def __init__(self, spec, batch, shape, dtype):
        h, w, c = shape
        self.k, self.s = spec.kernel_size, spec.step
        self.ho, self.wo = (h - self.k) // self.s + 1, (w - self.k) // self.s + 1
        self.shape = (self.ho, self.wo, c)
        self.taps = np.empty((batch, self.ho, self.wo, c, self.k, self.k), dtype)
        self.out = np.empty((batch, *self.shape), dtype)
        self.argmax = np.empty(self.out.shape, np.intp)
        self.hit, self.scratch = np.empty(self.out.shape, bool), np.empty_like(self.out)
        self.dx = np.empty((batch, h, w, c), dtype)

    def forward(self, x):
        np.copyto(self.taps, _windows(x, self.k, self.s))
        taps = self.taps.reshape(*self.out.shape, -1)
        np.argmax(taps, axis=-1, out=self.argmax)
        np.max(taps, axis=-1, out=self.out)
        return self.out

    def backward(self, dy):
        self.dx.fill(0)           # input positions in no window (or no window's max) get 0
        for i in range(self.k):
            for j in range(self.k):
                np.equal(self.argmax, i * self.k + j, out=self.hit)
                np.multiply(dy, self.hit, out=self.scratch)
                _tap(self.dx, i, j, self.s, self.ho, self.wo)[...] += self.scratch
        return self.dx

    def parameters(self):
        return []


class FlattenLayer:
    """torch.nn.Flatten(): channels-last images become rows in PyTorch's (C, H, W) order."""

    def __init__(self, batch, shape, dtype):
        self.shape = shape
        self.out = np.empty((batch, int(np.prod(shape))), dtype)

    def forward(self, x):
        if len(self.shape) == 3:
            h, w, c = self.shape
            np.copyto(self.out.reshape(-1, c, h, w), x.transpose(0, 3, 1, 2))
        else:
            np.copyto(self.out, x.reshape(self.out.shape))
        return self.out

    def backward(self, dy):
        if len(self.shape) == 3:
            h, w, c = self.shape
            return dy.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
        return dy.reshape(-1, *self.shape)

    def parameters(self):
        return []


def _sigmoid(z, out):
    np.negative(z, out=out)
    np.exp(out, out=out)
    out += 1
    np.reciprocal(out, out=out)


class LSTMLayer:
    """torch.nn.LSTM on time-major sequences (T, B, F) -> (T, B, H), zero initial state.

    Forward, per step t, with the gates' rows in PyTorch's order i, f, g, o:
        z_t = x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T                (B, 4H)
        i, f, o = sigmoid(z_t[i], z_t[f], z_t[o]),  g = tanh(z_t[g])
        c_t = f c_{t-1} + i g,   h_t = o tanh(c_t)
    The input's share of every z_t is one product before the loop; the gates' values, c_t
    and tanh(c_t) are kept for backward.  h_t is stored at states[t + 1], so states[0] = 0
    is h_{-1} and states[:T] every step's previous state, as one matrix.

    Backward through time, from the last step down, with dh_t = dy_t + (gradient from step
    t + 1) and dc_t = dc from step t + 1 (both 0 after the last step):
        do = dh_t tanh(c_t),   dc_t += dh_t o (1 - tanh(c_t)^2)
        di = dc_t g,   dg = dc_t i,   df = dc_t c_{t-1},   dc_{t-1} = dc_t f
        dz_t = [di i(1 - i), df f(1 - f), dg (1 - g^2), do o(1 - o)]
        dh_{t-1} = dz_t W_hh
    and after the loop, over all steps at once: dW_ih = dZ^T X, dW_hh = dZ^T H_prev,
    db_ih = db_hh = the column sums of dZ, dX = dZ W_ih.
    """

    def __init__(self, spec, w_ih, w_hh, b_ih, b_hh, batch, shape, needs_input_grad):
        (steps, features), dtype, H = shape, w_ih.dtype, spec.hidden_size
        self.H, self.shape = H, (steps, H)
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = w_ih, w_hh, b_ih, b_hh
        self.grads = [np.empty_like(p) for p in (w_ih, w_hh, b_ih, b_hh)]
        self.x = np.empty((steps, batch, features), dtype)          # contiguous copy
        self.gates = np.empty((steps, batch, 4 * H), dtype)         # z_t, then i, f, g, o
        self.states = np.zeros((steps + 1, batch, H), dtype)        # h_{-1} = 0, h_0 ...
        self.cells = np.zeros((steps + 1, batch, H), dtype)         # c_{-1} = 0, c_0 ...
        self.tanh_cells = np.empty((steps, batch, H), dtype)
        self.recurrent = np.empty((batch, 4 * H), dtype)             # h_{t-1} W_hh^T
        self.dz = np.empty_like(self.gates)
        self.dh, self.dc = np.empty((batch, H), dtype), np.empty((batch, H), dtype)
        self.scratch = np.empty((batch, H), dtype)
        self.dx = np.empty_like(self.x) if needs_input_grad else None

    def forward(self, x):
        H, steps = self.H, len(self.x)
        np.copyto(self.x, x)
        z = self.gates.reshape(-1, 4 * H)
        np.matmul(self.x.reshape(len(z), -1), self.w_ih.T, out=z)
        z += self.b_ih
        z += self.b_hh
        for t in range(steps):
            gates = self.gates[t]
            np.matmul(self.states[t], self.w_hh.T, out=self.recurrent)
            gates += self.recurrent
            _sigmoid(gates[:, :2 * H], gates[:, :2 * H])                # i, f
            np.tanh(gates[:, 2 * H:3 * H], out=gates[:, 2 * H:3 * H])   # g
            _sigmoid(gates[:, 3 * H:], gates[:, 3 * H:])                # o
            i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
            c = self.cells[t + 1]
            np.multiply(f, self.cells[t], out=c)
            np.multiply(i, g, out=self.scratch)
            c += self.scratch
            np.tanh(c, out=self.tanh_cells[t])
            np.multiply(o, self.tanh_cells[t], out=self.states[t + 1])
        return self.states[1:]

    def backward(self, dy):
        H, steps, dh, dc, tmp = self.H, len(self.x), self.dh, self.dc, self.scratch
        dh.fill(0)
        dc.fill(0)
        for t in reversed(range(steps)):
            dh += dy[t]
            i, f, g, o = (self.gates[t, :, k * H:(k + 1) * H] for k in range(4))
            di, df, dg, do = (self.dz[t, :, k * H:(k + 1) * H] for k in range(4))
            tanh_c = self.tanh_cells[t]
            np.multiply(dh, tanh_c, out=do)
            np.multiply(tanh_c, tanh_c, out=tmp)                 # dc += dh o (1 - tanh^2)
            np.subtract(1, tmp, out=tmp)
            tmp *= o
            tmp *= dh
            dc += tmp
            np.multiply(dc, g, out=di)
            np.multiply(dc, i, out=dg)
            np.multiply(dc, self.cells[t], out=df)
            dc *= f                                              # dc_{t-1}
            for d, s in ((di, i), (df, f), (do, o)):             # d *= s (1 - s)
                np.subtract(1, s, out=tmp)
                tmp *= s
                d *= tmp
            np.multiply(g, g, out=tmp)                           # dg *= 1 - g^2
            np.subtract(1, tmp, out=tmp)
            dg *= tmp
            np.matmul(self.dz[t], self.w_hh, out=dh)             # dh_{t-1}
        dz = self.dz.reshape(-1, 4 * H)
        dw_ih, dw_hh, db_ih, db_hh = self.grads
        np.matmul(dz.T, self.x.reshape(len(dz), -1), out=dw_ih)
        np.matmul(dz.T, self.states[:steps].reshape(len(dz), H), out=dw_hh)
        np.sum(dz, axis=0, out=db_ih)
        np.copyto(db_hh, db_ih)
        if self.dx is None:
            return None
        np.matmul(dz, self.w_ih, out=self.dx.reshape(len(dz), -1))
        return self.dx

    def parameters(self):
        return list(zip((self.w_ih, self.w_hh, self.b_ih, self.b_hh), self.grads))


class LastStepLayer:
    """The last step of a time-major sequence: (T, B, F) -> (B, F); its gradient reaches
    that step only."""

    def __init__(self, batch, shape, dtype):
        self.dx = np.zeros((shape[0], batch, shape[1]), dtype)     # earlier steps stay 0

    def forward(self, x):
        return x[-1]

    def backward(self, dy):
        np.copyto(self.dx[-1], dy)
        return self.dx

    def parameters(self):
        return []


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

    def __init__(self, spec, batch, dtype):
        n = spec.num_features
        self.gamma, self.beta = np.ones(n, dtype), np.zeros(n, dtype)
        self.dgamma, self.dbeta = np.empty_like(self.gamma), np.empty_like(self.beta)
        self.running_mean, self.running_var = np.zeros(n, dtype), np.ones(n, dtype)
        self.xhat = np.empty((batch, n), dtype)
        self.out = np.empty_like(self.xhat)
        self.dx = np.empty_like(self.xhat)
        self.inv_std = np.empty(n, dtype)

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
    def __init__(self, spec, batch, shape, dtype):
        self.name = spec.name
        self.out = np.empty((batch, *shape), dtype)
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

    def __init__(self, layers, batch, shape, dtype):
        self.layers = layers
        self.out = np.empty((batch, *shape), dtype)
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
    """The network of a benchmark config, trained by plain SGD in float32 (float64 for
    the tests' comparisons with autograd: in float32, rounding can flip a relu or a max
    pooling's choice where two values nearly tie, and so move a gradient).

    Parameters
    ----------
    config : configs.Config
    weights : list of tuples
        Initial weights of every Dense, Conv2d and LSTM layer in forward order, as
        networks.initial_weights: (W, b), W of shape (out, in) or (out_channels,
        in_channels, k, k); (W_ih, W_hh, b_ih, b_hh) for an LSTM.
    dtype : float32 or float64

    Raises NotImplementedError for a config it cannot build (batch norm of images).
    """

    def __init__(self, config, weights, dtype=np.float32):
        self.config, self.dtype = config, np.dtype(dtype)
        weights = iter(tuple(a.astype(dtype) for a in arrays) for arrays in weights)
        shape = tuple(config.input_shape)
        self.images = len(shape) == 3       # NCHW batches, handled channels-last inside
        self.sequences = len(shape) == 2    # (B, T, F) batches, handled time-major inside
        if self.images:
            shape = shape[1:] + shape[:1]
        self.layers = self._build(config.layers, config.batch, weights, shape, first=True)
        if config.classifier:   # the loss below applies the softmax
            self.layers[-1].activation = "identity"
        self.pairs = [pair for layer in self.layers for pair in layer.parameters()]
        self.probs = np.empty((config.batch, config.n_outputs), self.dtype)
        self.delta = np.empty_like(self.probs)

    def _build(self, specs, batch, weights, shape, first):
        """The layers of `specs`, whose input samples have `shape` ((H, W, C) for images)."""
        layers = []
        for spec in specs:
            if isinstance(spec, Dense):
                layers.append(DenseLayer(spec, *next(weights), batch, needs_input_grad=not first))
                shape = (spec.out_features,)
            elif isinstance(spec, Conv2d):
                layers.append(Conv2dLayer(spec, *next(weights), batch, shape,
                                          needs_input_grad=not first))
                shape = layers[-1].shape
            elif isinstance(spec, LSTM):
                layers.append(LSTMLayer(spec, *next(weights), batch, shape,
                                        needs_input_grad=not first))
                shape = layers[-1].shape
            elif isinstance(spec, LastStep):
                layers.append(LastStepLayer(batch, shape, self.dtype))
                shape = shape[1:]
            elif isinstance(spec, MaxPool2d):
                layers.append(MaxPool2dLayer(spec, batch, shape, self.dtype))
                shape = layers[-1].shape
            elif isinstance(spec, Flatten):
                layers.append(FlattenLayer(batch, shape, self.dtype))
                shape = layers[-1].out.shape[1:]
            elif isinstance(spec, BatchNorm):
                if len(shape) != 1:
                    raise NotImplementedError("numpy_reference has no batch norm of images")
                layers.append(BatchNormLayer(spec, batch, self.dtype))
            elif isinstance(spec, Activation):
                layers.append(ActivationLayer(spec, batch, shape, self.dtype))
            elif isinstance(spec, Residual):
                inner = self._build(spec.layers, batch, weights, shape, first=False)
                layers.append(ResidualLayer(inner, batch, shape, self.dtype))
            else:
                raise TypeError(f"numpy_reference: unknown layer spec {spec!r}")
            first = False
        return layers

    def compute_gradients(self, x, y):
        """Forward, loss and backward on one batch: fills every gradient, returns the loss."""
        if self.images:
            h = x.transpose(0, 2, 3, 1)         # NCHW -> channels-last view
        elif self.sequences:
            h = x.transpose(1, 0, 2)            # batch-first -> time-major view
        else:
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
