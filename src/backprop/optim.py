"""Optimizers: one class per update rule, with PyTorch's names, defaults and rules.

Each optimizer updates the network's whole flat parameter buffer in one fused pass
(compiled in ``_optim.pxd``).  Its state buffers (momentum, moment estimates, ...) have
the same shape as that buffer.  ``state_dict()`` / ``load_state_dict()`` round-trip
everything needed to resume training bit for bit.
"""

import contextlib
import math
import weakref

from backprop._core import OptimizerBase


def _check(name, value, low=0.0, high=None, *, open_high=False):
    """`value` as a finite float in [low, high] (or [low, high)), else a ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or not number >= low or (
            high is not None and not (number < high if open_high else number <= high)):
        bounds = f"[{low}, {high})" if open_high else (f"[{low}, {high}]" if high else f">= {low}")
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return number


def _flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class Optimizer(OptimizerBase):
    """Base class of the optimizers.  It has no update rule of its own: use SGD, Adam,
    AdamW, RMSprop or Adagrad (or a subclass of one of them).

    An optimizer class is one declaration: ``RULE``, the compiled rule it runs (a row of
    the rule table, ``backprop._core.RULES``; its kernel and the bound on what one update
    can write are in ``_optim.pxd``), ``STATE_NAMES``, the rule's state buffers in the
    order its kernel takes them, ``NONNEGATIVE``, those that hold sums of squares (a
    loaded state must agree: the bound counts on it), the validation of its settings in
    ``__init__``, the rule in words in its docstring, and ``hyperparameters()`` for
    ``state_dict``."""

    _owner = None      # a weak reference to the network it updates
    _carried = None    # the state a copy brings to the first network it fits

    def __init__(self, *args, **kwargs):
        raise TypeError("backprop.Optimizer is the base class; use SGD, Adam, AdamW, RMSprop "
                        "or Adagrad (the update rules the compiled core has)")

    def initial_state(self):
        """{state buffer name: first value}; buffers not named start at 0."""
        return {}

    @property
    def attached(self):
        """Whether a network (still alive) trains with this optimizer."""
        return self._owner is not None and self._owner() is not None

    def bind(self, size, dtype, owner=None):
        """Attach to the flat parameter buffer of `size` values of the network `owner`.
        The state starts afresh, unless the optimizer brings one that fits: the state a
        copy carries, or its own from a network it updated that was since collected (as
        a layer of that network keeps its weights, the optimizer keeps its state)."""
        carried = self._carried
        if carried is None and self.state and not self.attached:
            carried = self.state_dict()
        self._bind(size, dtype, self.initial_state())
        if owner is not None:
            self._owner = weakref.ref(owner)
        self._carried = None
        if carried is not None and all(v.shape == (size,) and v.dtype == dtype
                                       for v in carried["state"].values()):
            self.load_state_dict(carried)

    def _detach(self):
        """No network uses this optimizer any more: it is free, its state kept."""
        self._owner = None

    def __reduce__(self):
        # A copy (pickle, deepcopy) is a new, free optimizer with the same settings; it
        # carries its state to the first network of the same size that it is given to.
        carried = self.state_dict() if self.state else None
        return (_rebuild, (type(self), self.hyperparameters(), carried))

    def hyperparameters(self):
        raise NotImplementedError

    def state_dict(self):
        """Everything needed to resume: class name, hyperparameters, step count and state
        buffers (copies), all of one step boundary even while another thread trains its
        network (which waits for the copies)."""
        owner = self._owner() if self._owner is not None else None
        with owner.held() if owner is not None else contextlib.nullcontext():
            return {"name": type(self).__name__, "hyperparameters": self.hyperparameters(),
                    "step": self.steps,
                    "state": {k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict):
        if state_dict.get("name") != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict.get('name')!r}, "
                             f"not {type(self).__name__}")
        template = type(self)(**state_dict["hyperparameters"])   # validates them
        self._load(template, int(state_dict["step"]), dict(state_dict["state"]))
        self.__dict__.update(template.__dict__)   # Python-side settings (Adagrad's)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional momentum (as ``torch.optim.SGD``).

    For each parameter p with gradient g, at step t:

        g = g + weight_decay * p
        if momentum:  b = g if t == 1 else momentum * b + (1 - dampening) * g
                      g = g + momentum * b if nesterov else b
        p = p - lr * g
    """
    RULE = "sgd"
    STATE_NAMES = ("momentum_buffer",)

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        lr = _check("lr", lr)
        momentum = _check("momentum", momentum)
        dampening = _check("dampening", dampening)
        weight_decay = _check("weight_decay", weight_decay)
        nesterov = _flag("nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self._set_rule(lr=lr, momentum=momentum, dampening=dampening,
                       weight_decay=weight_decay, nesterov=nesterov)

    def hyperparameters(self):
        c = self._config()
        return {"lr": c["lr"], "momentum": c["momentum"], "dampening": c["dampening"],
                "weight_decay": c["weight_decay"], "nesterov": bool(c["nesterov"])}


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015), as ``torch.optim.Adam``.

    At step t, with g = grad + weight_decay * p:

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        v_max = max(v_max, v)                     (amsgrad only; then v_max replaces v)
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    RULE = "adam"
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq")
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        lr = _check("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _check("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        beta2 = _check("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        eps = _check("eps", eps)
        weight_decay = _check("weight_decay", weight_decay)
        self._set_rule(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, amsgrad=_flag("amsgrad", amsgrad),
                       decoupled=self.decoupled)

    @property
    def betas(self):
        c = self._config()
        return (c["beta1"], c["beta2"])

    def hyperparameters(self):
        c = self._config()
        return {"lr": c["lr"], "betas": self.betas, "eps": c["eps"],
                "weight_decay": c["weight_decay"], "amsgrad": bool(c["amsgrad"])}


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    Each step first shrinks the weights, p = p * (1 - lr * weight_decay), then applies
    the Adam update with the plain gradient.
    """
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), as ``torch.optim.RMSprop``.

    With g = grad + weight_decay * p:

        s = alpha * s + (1 - alpha) * g^2
        centered:  a = alpha * a + (1 - alpha) * g;  denom = sqrt(max(s - a^2, 0)) + eps
        otherwise: denom = sqrt(s) + eps
        momentum:  b = momentum * b + g / denom;  p = p - lr * b
        otherwise: p = p - lr * g / denom

    s - a^2 is a variance, never negative in exact arithmetic; rounding takes it a little
    below 0 when the gradient hardly varies (a constant gradient), where torch takes the
    square root of a negative number and writes NaN into the weights.  Clamping it at 0
    is the one difference from ``torch.optim.RMSprop``, and only where torch gives NaN.
    """
    RULE = "rmsprop"
    STATE_NAMES = ("square_avg", "grad_avg", "momentum_buffer")
    NONNEGATIVE = ("square_avg",)

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        self._set_rule(lr=_check("lr", lr),
                       alpha=_check("alpha", alpha, 0.0, 1.0), eps=_check("eps", eps),
                       weight_decay=_check("weight_decay", weight_decay),
                       momentum=_check("momentum", momentum),
                       centered=_flag("centered", centered))

    def hyperparameters(self):
        c = self._config()
        return {"lr": c["lr"], "alpha": c["alpha"], "eps": c["eps"],
                "weight_decay": c["weight_decay"], "momentum": c["momentum"],
                "centered": bool(c["centered"])}


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011), as ``torch.optim.Adagrad``.

    At step t, with g = grad + weight_decay * p:

        s = s + g^2                      (s starts at initial_accumulator_value)
        p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)
    """
    RULE = "adagrad"
    STATE_NAMES = ("sum",)
    NONNEGATIVE = ("sum",)

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        self.initial_accumulator_value = _check("initial_accumulator_value",
                                                initial_accumulator_value)
        self._set_rule(lr=_check("lr", lr), lr_decay=_check("lr_decay", lr_decay),
                       weight_decay=_check("weight_decay", weight_decay), eps=_check("eps", eps))

    def initial_state(self):
        return {"sum": self.initial_accumulator_value}

    def hyperparameters(self):
        c = self._config()
        return {"lr": c["lr"], "lr_decay": c["lr_decay"], "weight_decay": c["weight_decay"],
                "initial_accumulator_value": self.initial_accumulator_value, "eps": c["eps"]}


OPTIMIZERS = {cls.__name__: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad)}


def _rebuild(cls, hyperparameters, carried):
    optimizer = cls(**hyperparameters)
    optimizer._carried = carried
    return optimizer
