"""Network: a stack of Dense layers trained by backpropagation.

All parameters live in ONE contiguous buffer (``net.params``) and all gradients in
another (``net.grads``); each layer's ``weight``/``bias`` and their gradients are NumPy
views into them.  The optimizer is then one fused loop, a checkpoint one array, and
the compiled Engine needs only two pointers.
"""
import numpy as np

from backprop._core import LOSSES, Engine
from backprop import checkpoint, training
from backprop.layers import Dense
from backprop.optim import Adam, Optimizer

# The built-in losses that take the pre-activation logits need the matching output
# activation, as in PyTorch's CrossEntropyLoss (softmax inside) and BCEWithLogitsLoss.
LOSS_ACTIVATION = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}
DTYPES = ("float32", "float64")


class Network:
    """A feed-forward network of Dense layers.

    Parameters
    ----------
    layers : list of Dense
        Consecutive layers; each ``in_features`` must equal the previous ``out_features``.
    loss : {"mse", "binary_cross_entropy", "cross_entropy"} or None
        The built-in loss used by ``backward(y)``, ``train_step`` and ``fit``.  PyTorch's
        definitions and mean reductions.  ``cross_entropy`` needs a softmax output layer
        and takes integer labels of shape (batch,) or probability rows of shape
        (batch, classes); ``binary_cross_entropy`` needs a sigmoid output.  With None,
        gradients come from ``backward(grad_output=...)``.
    optimizer : Optimizer, default Adam()
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the weight initialisation (and, in ``fit``, the shuffling).

    Examples
    --------
    >>> import backprop as bp
    >>> net = bp.Network([bp.Dense(2, 8, "tanh"), bp.Dense(8, 1, "sigmoid")],
    ...                  loss="binary_cross_entropy", optimizer=bp.Adam(lr=0.05), seed=0)
    >>> X, y = bp.datasets.xor()
    >>> for _ in range(500):
    ...     loss = net.train_step(X, y)
    """

    def __init__(self, layers, loss=None, optimizer=None, dtype="float32", seed=None):
        layers = list(layers)
        if not layers or not all(isinstance(layer, Dense) for layer in layers):
            raise TypeError(f"layers must be a non-empty list of Dense layers, got {layers!r}")
        for i, (a, b) in enumerate(zip(layers, layers[1:])):
            if a.out_features != b.in_features:
                raise ValueError(f"layers[{i + 1}].in_features must equal layers[{i}]."
                                 f"out_features = {a.out_features}, got {b.in_features}")
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or None")
        wanted = LOSS_ACTIVATION.get(loss)
        if wanted and layers[-1].activation != wanted:
            raise ValueError(f"loss {loss!r} needs a {wanted!r} output layer, "
                             f"got activation {layers[-1].activation!r}")
        if str(np.dtype(dtype) if dtype in (np.float32, np.float64) else dtype) not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        optimizer = Adam() if optimizer is None else optimizer
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a backprop.optim.Optimizer, got {optimizer!r}")
        if optimizer.attached:
            raise ValueError("this optimizer already updates another Network; give each "
                             "network its own optimizer")

        self.layers = layers
        self.loss = loss
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.params = np.zeros(sum(layer.n_params for layer in layers), dtype=self.dtype)
        self.grads = np.zeros_like(self.params)
        self._attach_views()
        rng = np.random.default_rng(seed)
        for layer in layers:
            layer.weight[...] = layer.initial_weights(rng)
        self._engine = Engine([(l.in_features, l.out_features) for l in layers],
                              [l.activation for l in layers], self._offsets(), loss,
                              self.params, self.grads)
        self.optimizer = optimizer
        optimizer.bind(self.params.size, self.dtype)
        self.rng = np.random.default_rng(seed)   # shuffling in fit; saved in checkpoints
        self.epoch = 0                           # epochs trained by fit
        self.history = training.History()
        self.stop_training = False               # a fit callback may set it

    # ---- the flat buffers and their views

    def _offsets(self):
        offsets, start = [], 0
        for layer in self.layers:
            w = layer.out_features * layer.in_features
            offsets.append((start, start + w if layer.use_bias else -1))
            start += layer.n_params
        return offsets

    def _attach_views(self):
        for layer, (w, b) in zip(self.layers, self._offsets()):
            shape = (layer.out_features, layer.in_features)
            layer.weight = self.params[w:w + shape[0] * shape[1]].reshape(shape)
            layer.weight_grad = self.grads[w:w + shape[0] * shape[1]].reshape(shape)
            layer.bias = self.params[b:b + shape[0]] if b >= 0 else None
            layer.bias_grad = self.grads[b:b + shape[0]] if b >= 0 else None

    @property
    def n_inputs(self):
        return self.layers[0].in_features

    @property
    def n_outputs(self):
        return self.layers[-1].out_features

    # ---- the training step, piece by piece (PyTorch style) or in one call

    def forward(self, x):
        """Outputs for a batch x of shape (batch, n_inputs); returns (batch, n_outputs).

        The activations are kept for the next ``backward``.  x may be float32 or float64,
        strided or read-only: it is copied into the network's own input buffer."""
        return self._engine.forward(x).copy()

    __call__ = forward

    def backward(self, y=None, *, grad_output=None):
        """Backpropagate from the built-in loss against targets `y`, or from an external
        gradient `grad_output` = dL/d(output) of shape (batch, n_outputs).

        Gradients are added to ``grads`` (and each layer's ``weight_grad``/``bias_grad``)
        until ``zero_grad()``; dL/dx is available as ``input_grad``.  Returns the loss, or
        None with grad_output."""
        return self._engine.backward(y, grad_output)

    @property
    def input_grad(self):
        """dL/dx of the last backward, shape (batch, n_inputs) (a copy)."""
        return self._engine.input_grad().copy()

    def step(self):
        """Update the parameters from the accumulated gradients."""
        self._engine.step(self.optimizer)

    def zero_grad(self):
        """Set every gradient to zero."""
        self._engine.zero_grad()

    def train_step(self, x, y, rows=None):
        """forward + loss + backward + step + zero_grad in one call into compiled code;
        returns the loss (of the batch, before the update).

        rows : 1-D integer array, optional
            Train on x[rows], y[rows] instead, gathered straight into the network's input
            buffer (how ``fit`` draws shuffled minibatches without copying the dataset)."""
        return self._engine.train_step(x, y, self.optimizer, rows)

    def loss_of(self, x, y):
        """The built-in loss of the network on (x, y), without touching gradients."""
        self._engine.forward(x)
        return self._engine.loss_value(y)

    def grad_norm(self):
        """The Euclidean norm of all gradients together."""
        return self._engine.grad_norm()

    # ---- scikit-learn / Keras style training and inference

    def fit(self, X, y, *, epochs=10, batch_size=32, shuffle=True, validation_data=None,
            validation_split=0.0, early_stopping=None, lr_schedule=None, clip_grad_norm=None,
            progress=None, callbacks=(), comm=None):
        """Train on (X, y) for `epochs` passes in shuffled minibatches; returns the History.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_inputs)
        y : targets, as for ``backward`` (labels of shape (n_samples,) for cross_entropy)
        validation_data : (X_val, y_val), optional; or validation_split : float in [0, 1),
            the fraction taken from the end of X (before shuffling).
        early_stopping : int, optional
            Patience in epochs: stop once the validation loss has not improved for this
            many epochs, and keep the weights of the best epoch.
        lr_schedule : a schedule from ``backprop.schedules``, stepped once per epoch.
        clip_grad_norm : float, optional
            Rescale the gradients so their global norm is at most this before each step.
        progress : bool or None
            A progress bar (tqdm if installed, else a line per epoch); None shows it only
            when stderr is a terminal.
        callbacks : callables ``callback(net, epoch, logs)`` run after each epoch; one may
            set ``net.stop_training = True``.
        comm : mpi4py communicator, optional
            Data-parallel training over MPI (``backprop.distributed.fit``): run the same
            call with the same data and seed on every rank of ``comm``.

        Shuffling draws from ``net.rng`` (seeded by ``seed``), so training is
        reproducible, and resumable from a checkpoint.  If the loss stops being finite,
        fit raises ``FloatingPointError`` naming the epoch, step and first non-finite
        layer; the update of that step is not applied.
        """
        return training.fit(self, X, y, epochs=epochs, batch_size=batch_size, shuffle=shuffle,
                            validation_data=validation_data, validation_split=validation_split,
                            early_stopping=early_stopping, lr_schedule=lr_schedule,
                            clip_grad_norm=clip_grad_norm, progress=progress,
                            callbacks=callbacks, comm=comm)

    def predict(self, X, batch_size=1024):
        """Class labels for classifiers, raw outputs otherwise; computed in batches."""
        return training.predict(self, X, batch_size)

    def predict_proba(self, X, batch_size=1024):
        """Class probabilities (the softmax or sigmoid outputs); computed in batches."""
        if self.layers[-1].activation not in ("softmax", "sigmoid"):
            raise ValueError("predict_proba needs a softmax or sigmoid output layer, got "
                             f"{self.layers[-1].activation!r}; use predict")
        return training.predict_proba(self, X, batch_size)

    def evaluate(self, X, y, batch_size=1024):
        """{"loss": mean loss, "accuracy": fraction correct (classifiers)} on (X, y)."""
        return training.evaluate(self, X, y, batch_size)

    def save(self, path):
        """Write a checkpoint atomically (see ``backprop.checkpoint``)."""
        checkpoint.save(self, path)

    @classmethod
    def load(cls, path):
        """A network restored from ``save``: weights, optimizer state, RNG, history."""
        return checkpoint.load(path)

    def config(self):
        """The architecture as plain data (for checkpoints and copies)."""
        return {"layers": [layer.config() for layer in self.layers], "loss": self.loss,
                "dtype": self.dtype.name, "seed": self.seed}

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return (f"Network([\n  {inner}],\n  loss={self.loss!r}, optimizer={self.optimizer!r}, "
                f"dtype={self.dtype.name!r})")
