"""Check backpropagation against finite differences, using forward passes alone."""
import math

import numpy as np

from backprop import record


def float64_twin(net):
    """A float64 copy of `net`: same layers, parameters, buffers, mode and dropout keys."""
    header, arrays = record.to_record(net)
    header["network"]["dtype"] = "float64"
    return record.rebuild(type(net), header,
                          {name: a.astype(np.float64) for name, a in arrays.items()})


def gradcheck(net, x, y, *, eps=1e-5, floor=1e-4, max_params=None, seed=0):
    """Compare the gradients of `net`'s loss on (x, y) with central differences.

    Every parameter (or a random sample of `max_params` of them) and every input value
    (unless the input is an Embedding's integer ids) is nudged by +-eps in a float64 copy
    of the network, and (L(p+eps) - L(p-eps)) / 2eps
    is compared with the backpropagated gradient.  The relative error of a pair (a, n) is
    |a - n| / max(|a|, |n|, floor): relative for ordinary gradients, absolute near zero,
    where finite differences carry ~1e-11 of rounding noise.  eps = 1e-5 balances the
    difference's truncation error (~eps^2) against that rounding noise (~1e-16 / eps);
    both then stay near 1e-9 relative.

    Entries a layer declares to get no gradient (an Embedding's padding_idx row, as in
    PyTorch, although the loss depends on it) must have a backpropagated gradient of
    exactly zero.

    The check runs in the network's mode; in train mode every forward pass uses the same
    dropout masks (those of the network's next pass), so the loss is one function of
    the parameters.  BatchNorm in train mode is checked through its batch statistics.

    Returns a dict: ``max_error`` (worst over everything checked), ``param_error``,
    ``input_error``, ``checked`` (how many values).  The network itself is not modified.
    """
    twin = float64_twin(net)
    engine, passes = twin._engine, twin._engine.passes

    def loss():
        engine.passes = passes          # the same dropout masks every time
        return twin.loss_of(x, y)

    ids = twin._plan.geometry[0].ids
    x = np.array(x) if ids else np.array(x, dtype=np.float64)
    twin.zero_grad()
    engine.passes = passes
    twin.forward(x)
    twin.backward(y, input_grad=not ids)
    analytic = twin.grads.copy()
    analytic_x = np.zeros(0) if ids else twin.input_grad

    # Entries a layer declares gradient-free (padding_idx rows) are checked to be zero.
    free = np.zeros(twin.params.size, dtype=bool)
    for layer, (name, shape, _), offset in twin._plan.params:
        for param, index in layer.without_gradient().items():
            if param == name:
                free[offset:offset + math.prod(shape)].reshape(shape)[index] = True

    indices = np.arange(twin.params.size)
    if max_params is not None and max_params < indices.size:
        indices = np.random.default_rng(seed).choice(indices, max_params, replace=False)
    numeric = np.empty(indices.size)
    for k, i in enumerate(indices):
        if free[i]:
            numeric[k] = 0.0
            continue
        saved = twin.params[i]
        twin.params[i] = saved + eps
        up = loss()
        twin.params[i] = saved - eps
        down = loss()
        twin.params[i] = saved
        numeric[k] = (up - down) / (2 * eps)
    numeric_x = np.empty_like(analytic_x)
    for idx in np.ndindex(analytic_x.shape):
        saved = x[idx]
        x[idx] = saved + eps
        up = loss()
        x[idx] = saved - eps
        down = loss()
        x[idx] = saved
        numeric_x[idx] = (up - down) / (2 * eps)

    def worst(a, n):
        if a.size == 0:
            return 0.0
        return float(np.max(np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)))

    param_error = worst(analytic[indices], numeric)
    input_error = worst(analytic_x, numeric_x)
    return {"max_error": max(param_error, input_error), "param_error": param_error,
            "input_error": input_error, "checked": int(indices.size + analytic_x.size)}
