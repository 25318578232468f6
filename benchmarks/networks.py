"""The one place that turns a benchmark config into a network, for every framework.

For each framework, a ``*_network`` function builds the network of a `configs.Config` and
a ``*_step`` function returns a closure that runs one training step (forward, loss,
backward, SGD update, float32) on one fixed batch and returns the loss as a Python float
(so every framework finishes its step before the next starts).  All frameworks but
scikit-learn start from the same weights (`initial_weights`), so their losses agree step
for step: `compare.py` checks it before timing.

A framework that cannot express a config raises `Unsupported` with the reason.
"""
from functools import partial

import numpy as np

from configs import (EPS, LSTM, MOMENTUM, WEIGHTED, Activation, BatchNorm, Conv2d, Dense,
                     Flatten, LastStep, MaxPool2d, Residual)
from numpy_reference import NumpyNetwork


class Unsupported(Exception):
    """This framework cannot build this config (the message says why)."""


def initial_weights(config, seed=0):
    """The parameters of every Dense, Conv2d and LSTM layer in forward order, float32, one
    tuple per layer in the order of its spec's `parameter_names` (PyTorch's): (W, b), W of
    shape (out, in) for a Dense, (out_channels, in_channels, k, k) for a Conv2d; (W_ih,
    W_hh, b_ih, b_hh) for an LSTM.

    W ~ N(0, gain/fan_in), fan_in = in (Dense) or in_channels*k*k (Conv2d): gain 2 before a
    fused relu (He et al., 2015), else 1 (LeCun), which keeps the residual configs' logits
    moderate; b ~ U(-0.1, 0.1), so that the bias gradients take part in the peers'
    agreement check.  An LSTM's four arrays are PyTorch's default, U(-1/sqrt(hidden),
    1/sqrt(hidden)), nonzero biases included.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for spec in config.weighted_layers():
        if isinstance(spec, LSTM):
            limit = 1 / np.sqrt(spec.hidden_size)
            weights.append(tuple(rng.uniform(-limit, limit, shape).astype(np.float32)
                                 for shape in spec.parameter_shapes))
            continue
        shape = spec.weight_shape
        gain = 2.0 if spec.activation == "relu" else 1.0
        w = rng.normal(size=shape) * np.sqrt(gain / np.prod(shape[1:]))
        b = rng.uniform(-0.1, 0.1, shape[0])
        weights.append((w.astype(np.float32), b.astype(np.float32)))
    return weights


def batch_for(config, seed=0):
    """One fixed batch: x ~ N(0, 1) float32 (batch, *input_shape), NCHW for images; y class
    indices (int64) for a classifier, else 0/1 targets float32 (batch, out)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(config.batch, *config.input_shape)).astype(np.float32)
    if config.classifier:
        return x, rng.integers(0, config.n_outputs, config.batch)
    return x, (rng.random((config.batch, config.n_outputs)) > 0.5).astype(np.float32)


def _output_fused(config, spec, last):
    """Whether this Dense's softmax is left to a loss that applies it (torch, JAX, NumPy)."""
    return last and config.classifier and spec.activation == "softmax"


# ----------------------------------------------------------------------------- backprop

def backprop_network(config, weights=None, optimizer=None, seed=0):
    """A bp.Network of `config` (float32); SGD(lr=config.lr) unless `optimizer` is given."""
    import backprop as bp
    layers = [_bp_layer(bp, spec) for spec in config.layers]
    net = bp.Network(layers, loss=config.loss, optimizer=optimizer or bp.SGD(lr=config.lr),
                     dtype="float32", seed=seed, input_shape=config.input_shape)
    if weights is not None:
        specs = config.weighted_layers()
        layers = list(_bp_weighted_layers(bp, net.layers))
        for spec, layer, arrays in zip(specs, layers, weights, strict=True):
            for name, value in zip(spec.parameter_names, arrays, strict=True):
                getattr(layer, name)[...] = value
    return net


# The bp class of each spec, and the issue that brought it (for the message when missing).
_BP_NEEDS = {BatchNorm: ("BatchNorm", 8), Activation: ("Activation", 8), Residual: ("Residual", 8),
             Conv2d: ("Conv2d", 16), MaxPool2d: ("MaxPool2d", 16), Flatten: ("Flatten", 16),
             LSTM: ("LSTM", 18), LastStep: ("LastStep", 18)}


def _bp_layer(bp, spec):
    if type(spec) in _BP_NEEDS and not hasattr(bp, _BP_NEEDS[type(spec)][0]):
        raise Unsupported("backprop has no bp.{} yet (issue {})".format(*_BP_NEEDS[type(spec)]))
    if isinstance(spec, Dense):
        return bp.Dense(spec.in_features, spec.out_features, spec.activation)
    if isinstance(spec, Conv2d):
        return bp.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size,
                         stride=spec.stride, padding=spec.padding, activation=spec.activation)
    if isinstance(spec, MaxPool2d):
        return bp.MaxPool2d(spec.kernel_size, stride=spec.step)
    if isinstance(spec, Flatten):
        return bp.Flatten()
    if isinstance(spec, LSTM):
        return bp.LSTM(spec.input_size, spec.hidden_size)
    if isinstance(spec, LastStep):
        return bp.LastStep()
    if isinstance(spec, BatchNorm):
        return bp.BatchNorm(spec.num_features, eps=EPS, momentum=MOMENTUM)
    if isinstance(spec, Activation):
        return bp.Activation(spec.name)
    if isinstance(spec, Residual):
        return bp.Residual(*(_bp_layer(bp, inner) for inner in spec.layers))
    raise TypeError(f"no backprop layer mapped for spec {spec!r}")


def _bp_weighted_layers(bp, layers):
    """The Dense, Conv2d and LSTM layers in forward order, as
    configs.Config.weighted_layers (a backprop from before issue 16 has no Conv2d, from
    before issue 18 no LSTM)."""
    weighted = tuple(getattr(bp, name) for name in ("Dense", "Conv2d", "LSTM")
                     if hasattr(bp, name))
    for layer in layers:
        if isinstance(layer, weighted):
            yield layer
        elif hasattr(layer, "layers"):            # a Residual block
            yield from _bp_weighted_layers(bp, layer.layers)


def backprop_step(config, weights, precision="float32"):
    net = backprop_network(config, weights)
    net.precision = precision
    x, y = batch_for(config)
    return lambda: net.train_step(x, y)


def backprop_bf16_step(config, weights):
    """Products in bfloat16 (mixed precision, float32 weights): `bp.Network(precision=)`."""
    return backprop_step(config, weights, precision="bfloat16")


# -------------------------------------------------------------------------------- NumPy

def numpy_step(config, weights):
    try:
        net = NumpyNetwork(config, weights)
    except NotImplementedError as e:
        raise Unsupported(str(e)) from None
    x, y = batch_for(config)
    return lambda: net.train_step(x, y)


# ------------------------------------------------------------------------------ PyTorch

def torch_model(config, weights=None):
    """A torch.nn.Sequential of `config`; a final softmax is left to CrossEntropyLoss."""
    import torch
    weights = iter(weights) if weights is not None else None
    modules = _torch_modules(torch, config, config.layers, weights, top=True)
    return torch.nn.Sequential(*modules)


def _torch_modules(torch, config, specs, weights, top):
    nn, modules = torch.nn, []
    for i, spec in enumerate(specs):
        if isinstance(spec, WEIGHTED):
            if isinstance(spec, Dense):
                module = nn.Linear(spec.in_features, spec.out_features)
            elif isinstance(spec, LSTM):
                module = nn.LSTM(spec.input_size, spec.hidden_size, batch_first=True)
            else:
                module = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size,
                                   stride=spec.stride, padding=spec.padding)
            if weights is not None:
                with torch.no_grad():
                    for name, value in zip(spec.parameter_names, next(weights), strict=True):
                        getattr(module, name).copy_(torch.from_numpy(value))
            if isinstance(spec, LSTM):
                modules.append(_torch_sequence_output(torch)(module))
            else:
                modules.append(module)
                if not _output_fused(config, spec, top and i == len(specs) - 1):
                    modules += _torch_activation(nn, spec.activation)
        elif isinstance(spec, LastStep):
            modules.append(_torch_last_step(torch)())
        elif isinstance(spec, MaxPool2d):
            modules.append(nn.MaxPool2d(spec.kernel_size, stride=spec.step))
        elif isinstance(spec, Flatten):
            modules.append(nn.Flatten())
        elif isinstance(spec, BatchNorm):
            modules.append(nn.BatchNorm1d(spec.num_features, eps=EPS, momentum=MOMENTUM))
        elif isinstance(spec, Activation):
            modules += _torch_activation(nn, spec.name)
        elif isinstance(spec, Residual):
            body = _torch_modules(torch, config, spec.layers, weights, top=False)
            modules.append(_torch_residual(torch)(nn.Sequential(*body)))
        else:
            raise TypeError(f"no torch module mapped for spec {spec!r}")
    return modules


def _torch_activation(nn, name):
    if name == "identity":
        return []
    kinds = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    if name not in kinds:
        raise Unsupported(f"no torch module mapped for activation {name!r}")
    return [kinds[name]()]


def _torch_residual(torch):
    class Residual(torch.nn.Module):
        """x + body(x)."""

        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return x + self.body(x)
    return Residual


def _torch_sequence_output(torch):
    class SequenceOutput(torch.nn.Module):
        """The recurrent module's output sequence alone, for nn.Sequential (nn.LSTM returns
        (output, (h_n, c_n)))."""

        def __init__(self, recurrent):
            super().__init__()
            self.recurrent = recurrent

        def forward(self, x):
            return self.recurrent(x)[0]
    return SequenceOutput


def _torch_last_step(torch):
    class LastStep(torch.nn.Module):
        """output[:, -1] of a batch-first sequence."""

        def forward(self, x):
            return x[:, -1]
    return LastStep


def torch_loss(config):
    import torch
    return torch.nn.CrossEntropyLoss() if config.classifier else torch.nn.MSELoss()


# torch.optim's three implementations of an update: "for-loop" (its CPU default), "foreach"
# (multi-tensor ops) and "fused" (one kernel; torch's docs rank fused > foreach > for-loop).
TORCH_IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True},
                         "fused": {"fused": True}}


def torch_optimizer(kind, model, lr, implementation="fused"):
    """torch.optim.`kind` (e.g. "SGD", "Adam") over the model's parameters."""
    import torch
    return getattr(torch.optim, kind)(model.parameters(), lr=lr,
                                      **TORCH_IMPLEMENTATIONS[implementation])


def torch_step(config, weights, implementation="fused", autocast=False):
    """One SGD step; with `autocast`, the forward and the loss run under
    torch.autocast("cpu", dtype=torch.bfloat16), as PyTorch's mixed-precision recipe has
    it (the backward follows the forward's precisions; the weights stay float32)."""
    import torch
    model = torch_model(config, weights)
    opt = torch_optimizer("SGD", model, config.lr, implementation)
    loss_fn = torch_loss(config)
    x, y = (torch.from_numpy(v) for v in batch_for(config))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def torch_bf16_step(config, weights, implementation="fused"):
    return torch_step(config, weights, implementation, autocast=True)


# ---------------------------------------------------------------------------------- JAX

def jax_step(config, weights):
    """A jit-compiled SGD step; parameters and running statistics are donated to it, so
    XLA updates them in place."""
    import functools

    import jax
    import jax.numpy as jnp

    params, stats = [], []
    apply = _jax_apply(jnp, config, config.layers, iter(weights), params, stats, top=True)

    def loss_fn(params, stats, x, y):
        new_stats = list(stats)
        out = apply(params, stats, new_stats, x)
        if config.classifier:
            logp = jax.nn.log_softmax(out, axis=1)
            loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        else:
            loss = jnp.mean((out - y) ** 2)
        return loss, new_stats

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, stats, x, y):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
        return [p - config.lr * g for p, g in zip(params, grads)], new_stats, loss

    x, y = (jnp.asarray(v) for v in batch_for(config))
    state = [[jnp.asarray(p) for p in params], [jnp.asarray(s) for s in stats]]

    def step():
        state[0], state[1], loss = train_step(state[0], state[1], x, y)
        return float(loss)
    return step


def _jax_apply(jnp, config, specs, weights, params, stats, top):
    """Build f(params, stats, new_stats, x) -> y for `specs`, appending the initial values
    of their parameters to `params` and of their running statistics to `stats`."""
    fns = []
    for i, spec in enumerate(specs):
        if isinstance(spec, LSTM):
            fns.append(_jax_lstm(jnp, len(params)))
            params.extend(next(weights))
        elif isinstance(spec, LastStep):
            fns.append(lambda p, s, ns, x: x[:, -1])
        elif isinstance(spec, WEIGHTED):
            fused = _output_fused(config, spec, top and i == len(specs) - 1)
            make = _jax_dense if isinstance(spec, Dense) else partial(_jax_conv2d, spec=spec)
            fns.append(make(jnp, len(params), "identity" if fused else spec.activation))
            params.extend(next(weights))
        elif isinstance(spec, MaxPool2d):
            fns.append(_jax_max_pool2d(spec))
        elif isinstance(spec, Flatten):
            fns.append(lambda p, s, ns, x: x.reshape(x.shape[0], -1))
        elif isinstance(spec, BatchNorm):
            fns.append(_jax_batchnorm(jnp, len(params), len(stats)))
            n = spec.num_features
            ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
            params += [ones, zeros]                     # gamma, beta
            stats += [zeros.copy(), ones.copy()]        # running mean, running variance
        elif isinstance(spec, Activation):
            act = _jax_activation(jnp, spec.name)
            fns.append(lambda p, s, ns, x, act=act: act(x))
        elif isinstance(spec, Residual):
            body = _jax_apply(jnp, config, spec.layers, weights, params, stats, top=False)
            fns.append(lambda p, s, ns, x, body=body: x + body(p, s, ns, x))
        else:
            raise TypeError(f"no JAX function mapped for spec {spec!r}")

    def apply(p, s, ns, x):
        for fn in fns:
            x = fn(p, s, ns, x)
        return x
    return apply


def _jax_activation(jnp, name):
    import jax
    kinds = {"identity": lambda z: z, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid,
             "tanh": jnp.tanh}
    if name not in kinds:
        raise Unsupported(f"no JAX function mapped for activation {name!r}")
    return kinds[name]


def _jax_dense(jnp, k, activation):
    act = _jax_activation(jnp, activation)
    return lambda p, s, ns, x: act(x @ p[k].T + p[k + 1])


def _jax_conv2d(jnp, k, activation, spec):
    """lax.conv_general_dilated in PyTorch's layouts: NCHW input, OIHW weight, NCHW output."""
    from jax import lax
    act = _jax_activation(jnp, activation)
    stride, pad = (spec.stride,) * 2, [(spec.padding, spec.padding)] * 2

    def conv(p, s, ns, x):
        y = lax.conv_general_dilated(x, p[k], stride, pad,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return act(y + p[k + 1][None, :, None, None])
    return conv


def _jax_max_pool2d(spec):
    """lax.reduce_window with max over each channel's window (no padding)."""
    from jax import lax
    window, strides = (1, 1, spec.kernel_size, spec.kernel_size), (1, 1, spec.step, spec.step)
    return lambda p, s, ns, x: lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, window,
                                                   strides, "VALID")


def _jax_lstm(jnp, k):
    """An LSTM over batch-first sequences, as a JAX user writes it: the input's product
    with W_ih for all steps at once (one GEMM: no step waits on it), then lax.scan over
    time carrying (h, c), one h.W_hh^T product per step; gates i, f, g, o."""
    import jax
    from jax import lax

    def lstm(p, s, ns, x):
        w_ih, w_hh, b_ih, b_hh = p[k:k + 4]
        projected = jnp.swapaxes(x @ w_ih.T + (b_ih + b_hh), 0, 1)     # (time, batch, 4H)

        def step(carry, z_input):
            h, c = carry
            i, f, g, o = jnp.split(z_input + h @ w_hh.T, 4, axis=1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((x.shape[0], w_hh.shape[1]), x.dtype)
        _, hs = lax.scan(step, (zeros, zeros), projected)
        return jnp.swapaxes(hs, 0, 1)                                   # (batch, time, H)
    return lstm


def _jax_batchnorm(jnp, k, j):
    def batchnorm(p, s, ns, x):
        rows = x.shape[0]
        mean = jnp.mean(x, axis=0)
        var = jnp.mean((x - mean) ** 2, axis=0)              # biased, for normalising
        ns[j] = (1 - MOMENTUM) * s[j] + MOMENTUM * mean
        ns[j + 1] = (1 - MOMENTUM) * s[j + 1] + MOMENTUM * var * (rows / (rows - 1))
        return (x - mean) / jnp.sqrt(var + EPS) * p[k] + p[k + 1]
    return batchnorm


# -------------------------------------------------------------------------- scikit-learn

def sklearn_step(config, weights=None):
    """MLPClassifier/MLPRegressor.partial_fit on the batch: one SGD step without momentum
    or L2 penalty (alpha=0), from scikit-learn's own initial weights (it cannot take
    others before its first step).  MLPRegressor's output is linear, not sigmoid."""
    shape = config.mlp_sizes()
    if shape is None:
        raise Unsupported("scikit-learn's MLP has no convolution, pooling, recurrent layer, "
                          "batch norm, residual or per-layer activations")
    sizes, hidden = shape
    kinds = {"relu": "relu", "sigmoid": "logistic", "tanh": "tanh", "identity": "identity"}
    if hidden not in kinds:
        raise Unsupported(f"scikit-learn's MLP has no activation {hidden!r}")
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    kind = MLPClassifier if config.classifier else MLPRegressor
    model = kind(hidden_layer_sizes=sizes[1:-1], activation=kinds[hidden], solver="sgd",
                 learning_rate_init=config.lr, momentum=0.0, nesterovs_momentum=False,
                 alpha=0.0, batch_size=config.batch, shuffle=False, random_state=0)
    x, y = batch_for(config)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()                       # scikit-learn wants one output as a vector
    extra = {"classes": np.arange(config.n_outputs)} if config.classifier else {}

    def step():
        model.partial_fit(x, y, **extra)
        return model.loss_
    return step


STEPS = {"backprop": backprop_step, "numpy": numpy_step, "jax": jax_step,
         "torch": torch_step, "sklearn": sklearn_step,
         "backprop-bf16": backprop_bf16_step, "torch-bf16": torch_bf16_step}
