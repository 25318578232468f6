"""Network: a sequence of layers trained by backpropagation.

All parameters live in ONE contiguous buffer (``net.params``), all gradients in another
(``net.grads``) and all running statistics in a third (``net.buffers``); each layer's
arrays are NumPy views into them.  The optimizer is then one fused loop, a checkpoint a
few arrays, and the compiled Engine needs only three pointers.  ``plan.py`` lays the
layers out; ``record.py`` turns a network into plain data and back (checkpoints,
pickling, copies).
"""
import contextlib
import math

import numpy as np

from backprop._core import Engine
from backprop import losses, plan as planner, record, training
from backprop.optim import Adam, Optimizer

DTYPES = ("float32", "float64")


def _dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(name)


def _views(plan, params, grads, buffers):
    """{id(layer): {name: view}} of each layer's parameters, their gradients and its
    buffers in the flat arrays."""
    views = {id(layer): {} for layer in plan.layers}
    for layer, (name, shape, _), offset in plan.params:
        end = offset + math.prod(shape)
        views[id(layer)][name] = params[offset:end].reshape(shape)
        views[id(layer)][name + "_grad"] = grads[offset:end].reshape(shape)
    for layer, name, offset, shape, _ in plan.buffers:
        views[id(layer)][name] = buffers[offset:offset + math.prod(shape)].reshape(shape)
    return views


def _built_from(name, doc):
    """A read-only attribute: the engine was built from it, so a new value would leave the
    Python side and what runs out of step (forward keeping the old arrays, save failing)."""
    def refuse(self, value):
        # `net.grads /= 2` works in place and then sets the same array again: that is fine.
        if value is not getattr(self, f"_{name}"):
            raise AttributeError(
                f"Network.{name} cannot be reassigned: the compiled network was built from "
                f"it; write into the arrays (net.params[...] = values), or build a new Network")
    return property(lambda self: getattr(self, f"_{name}"), refuse, doc=doc)


def _check_optimizer(optimizer, network):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a backprop.optim.Optimizer, got {optimizer!r}")
    if optimizer.attached and optimizer._owner() is not network:
        raise ValueError("this optimizer already updates another Network; give each "
                         "network its own optimizer")


class Network:
    """A feed-forward network: layers applied in order.

    Parameters
    ----------
    layers : list of layers
        Any of ``backprop.layers`` (Dense, Conv2d, BatchNorm, Flatten, Residual, ...); each
        layer's input must fit the previous layer's output (checked here, naming the layer
        and both shapes).
    loss : {"mse", "binary_cross_entropy", "cross_entropy"} or None
        The built-in loss used by ``backward(y)``, ``train_step`` and ``fit``.  PyTorch's
        definitions and mean reductions.  ``cross_entropy`` needs a softmax output
        and takes integer labels of shape (batch,) or probability rows of shape
        (batch, classes); ``binary_cross_entropy`` needs a sigmoid output.  With None,
        gradients come from ``backward(grad_output=...)``.
    optimizer : Optimizer, default Adam()
    dtype : {"float32", "float64"}
    precision : {"float32", "bfloat16"}
        What the products of Dense, convolution and recurrent layers multiply, forward and
        backward.  "bfloat16" is mixed precision as ``torch.autocast("cpu",
        dtype=torch.bfloat16)`` and Keras's ``mixed_bfloat16`` policy do it: each operand
        rounded to bfloat16 as the product packs it, the products summed in float32; the
        weights (and the optimizer's updates), activations, normalisations and losses stay
        float32, and no loss scaling is needed (bfloat16 has float32's exponent range).
        About twice as fast where the CPU has AVX512_BF16 (``bp.bfloat16_kernel()``
        says "avx512_bf16"), emulated (same numbers, no faster) elsewhere.  float32
        networks only.  ``net.precision`` can be reassigned, or changed for a block
        with ``net.autocast()``.
    seed : int or None
        Seeds the weight initialisation, the shuffling in ``fit`` and the dropout masks.
    input_shape : tuple of int, optional
        The shape of one input sample, as PyTorch has it: (features,), (channels, length),
        (channels, height, width), or (length,) of integer ids for an Embedding.  Needed
        when the first layer does not fix it (a convolution, an Embedding); a Dense,
        BatchNorm or LayerNorm first layer fixes (features,).

    A network starts in train mode (``net.training``); ``net.eval()`` and ``net.train()``
    switch, as in PyTorch.

    Examples
    --------
    >>> import backprop as bp
    >>> net = bp.Network([bp.Dense(2, 8, "tanh"), bp.Dense(8, 1, "sigmoid")],
    ...                  loss="binary_cross_entropy", optimizer=bp.Adam(lr=0.05), seed=0)
    >>> X, y = bp.datasets.xor()
    >>> for _ in range(500):
    ...     loss = net.train_step(X, y)
    """

    def __init__(self, layers, loss=None, optimizer=None, dtype="float32", seed=None,
                 input_shape=None, precision="float32"):
        self._build(list(layers), loss, optimizer, dtype, seed, initialise=True,
                    input_shape=input_shape, precision=precision)

    def _build(self, layers, loss, optimizer, dtype, seed, initialise, key_seed=None,
               input_shape=None, precision="float32"):
        declared = losses.get(loss)
        dtype = _dtype(dtype)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed < 2 ** 63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        optimizer = Adam() if optimizer is None else optimizer
        _check_optimizer(optimizer, self)
        # Dropout's masks are keyed by a seed even when the caller gave none.
        if key_seed is None:
            key_seed = int(seed) if seed is not None else int(
                np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        plan = planner.plan(layers, declared, key_seed, input_shape)
        output = plan.output_activation
        if declared is not None and declared.output is not None and output != declared.output:
            # The loss reads the logits of this activation (as PyTorch's CrossEntropyLoss
            # applies the softmax itself, BCEWithLogitsLoss the sigmoid).
            raise ValueError(f"loss {loss!r} needs a {declared.output!r} output, got {output!r}")
        for layer in plan.layers:      # refuse before changing any layer
            layer._check_free(self)

        # Everything that can fail comes before any layer or the optimizer is touched, so
        # a refused network leaves them as they were (free, with their own weights).
        params = np.zeros(plan.n_params, dtype=dtype)
        grads = np.zeros_like(params)
        buffers = np.zeros(plan.n_buffers, dtype=dtype)
        views = _views(plan, params, grads, buffers)
        # A layer brings its own values (a copy's, or those of a network it belonged to
        # that was since collected, as a torch module keeps its weights); the others
        # start from their initialisation, drawn in order from `seed`.
        kept = {id(layer): layer._values() for layer in plan.layers}
        rng = np.random.default_rng(seed)
        for layer in plan.layers:
            values = kept[id(layer)]
            if values is None and initialise:
                values = layer.initial_parameters(rng)
            for name, value in (values or {}).items():
                views[id(layer)][name][...] = value
        for layer, name, offset, shape, value in plan.buffers:
            if kept[id(layer)] is None:
                buffers[offset:offset + math.prod(shape)] = value
        engine = Engine(plan, declared, params, grads, buffers)
        engine.precision = precision      # refused here (float32 only) before any layer moves
        optimizer.bind(params.size, dtype, owner=self)

        self._layers = tuple(layers)
        self._loss = loss
        self._loss_spec = declared
        self._dtype = dtype
        self._seed = None if seed is None else int(seed)
        self._output_activation = output
        self._plan = plan
        self._key_seed = key_seed
        self._params, self._grads, self._buffers = params, grads, buffers
        self._engine = engine
        self._optimizer = optimizer
        for layer in plan.layers:
            layer._attach(self, views[id(layer)])          # its values now live here
        self.rng = np.random.default_rng(seed)   # shuffling in fit; saved in checkpoints
        self.epoch = 0                           # epochs trained by fit
        self.history = training.History()
        self.stop_training = False               # a fit callback may set it

    # ---- what the compiled engine was built from: read-only, so the two cannot part ways

    layers = _built_from("layers", "The layers given, as a tuple.")
    params = _built_from("params", "Every parameter in one flat array; the layers' weights "
                                   "are views of it (write into it: net.params[...] = w).")
    grads = _built_from("grads", "Every parameter's gradient, laid out as params.")
    buffers = _built_from("buffers", "Every running statistic (BatchNorm's), in one flat array.")
    dtype = _built_from("dtype", "The numpy dtype of every array: float32 or float64.")
    loss = _built_from("loss", "The built-in loss's name, or None.")
    loss_spec = _built_from("loss_spec", "The built-in loss's declaration (losses.py), or None.")
    seed = _built_from("seed", "The seed given, or None.")
    output_activation = _built_from("output_activation", "The last layer's activation.")

    @property
    def optimizer(self):
        """The optimizer ``step``, ``train_step`` and ``fit`` use.  Assigning another one
        trains with it from the next step: it takes this network's parameters (bringing
        the state a copy carries, or the one it kept from a network since collected, when
        it fits), and the one it replaces is free for another network, its state kept."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer):
        _check_optimizer(optimizer, self)
        if optimizer is self._optimizer:
            return
        optimizer.bind(self.params.size, self.dtype, owner=self)
        self._optimizer, old = optimizer, self._optimizer
        old._detach()

    @property
    def precision(self):
        """What the products multiply: "float32" or "bfloat16" (see the class docstring).
        Assigning switches from the next pass (the weights stay float32)."""
        return self._engine.precision

    @precision.setter
    def precision(self, precision):
        self._engine.precision = precision      # checked there (float32 networks only)

    @contextlib.contextmanager
    def autocast(self, dtype="bfloat16"):
        """``with net.autocast():`` runs the block's passes with their products in
        bfloat16 (or `dtype`), as ``torch.autocast("cpu", dtype=torch.bfloat16)`` does
        for a PyTorch model, and restores the precision the network had on exit."""
        before = self.precision
        self.precision = dtype
        try:
            yield self
        finally:
            self.precision = before

    @property
    def input_shape(self):
        """The shape of one input sample, e.g. (784,) or (1, 28, 28)."""
        return self._plan.input_shape

    @property
    def output_shape(self):
        """The shape of one output sample, e.g. (10,)."""
        return self._plan.output_shape

    @property
    def n_inputs(self):
        """The values in one input sample."""
        return math.prod(self.input_shape)

    @property
    def n_outputs(self):
        """The values in one output sample."""
        return math.prod(self.output_shape)

    # ---- modes

    @property
    def training(self):
        """True in train mode (batch statistics, dropout), False in eval mode."""
        return self._engine.training

    def train(self, mode=True):
        """Switch to train mode (or eval mode with mode=False); returns the network."""
        self._engine.training = bool(mode)
        return self

    def eval(self):
        """Switch to eval mode: BatchNorm uses its running statistics, Dropout passes
        everything through.  Returns the network."""
        return self.train(False)

    # ---- the training step, piece by piece (PyTorch style) or in one call

    def forward(self, x):
        """Outputs for a batch x of shape (batch, *input_shape); returns (batch,
        *output_shape).

        The activations are kept for the next ``backward``.  x may be float32 or float64,
        strided or read-only: it is copied into the network's own input buffer."""
        return self._engine.forward(x)

    __call__ = forward

    def backward(self, y=None, *, grad_output=None, input_grad=True):
        """Backpropagate from the built-in loss against targets `y`, or from an external
        gradient `grad_output` = dL/d(output) of shape (batch, *output_shape).

        Gradients are added to ``grads`` (and each layer's ``weight_grad``/``bias_grad``)
        until ``zero_grad()``; dL/dx is available as ``input_grad`` unless
        ``input_grad=False`` skips computing it (one matrix product less).  Returns the
        loss, or None with grad_output.

        It needs the activations of a forward made with the current weights: after
        ``step()`` or ``train_step()`` call ``forward`` again (PyTorch likewise refuses to
        backpropagate through tensors an optimizer step has modified in place)."""
        return self._engine.backward(y, grad_output, input_grad)

    @property
    def input_grad(self):
        """dL/dx of the last backward, shaped like x (a copy)."""
        return self._engine.input_grad()

    def step(self):
        """Update the parameters from the accumulated gradients.  Gradients that are not
        finite, or an update that would overflow, are refused (FloatingPointError) and
        nothing changes."""
        self._engine.step(self.optimizer)

    def zero_grad(self):
        """Set every gradient to zero."""
        self._engine.zero_grad()

    def train_step(self, x, y, rows=None, *, sample_weight=None, l2=0.0,
                   clip_grad_norm=None):
        """forward + loss + backward + step + zero_grad in one call into compiled code;
        returns the loss (of the batch, before the update).

        rows : 1-D integer array, optional
            Train on x[rows], y[rows] instead, gathered straight into the network's input
            buffer (how ``fit`` draws shuffled minibatches without copying the dataset).
        sample_weight : 1-D float array, optional
            One weight per row of x (finite, >= 0): the loss becomes the weighted mean
            sum(w_i * loss_i) / sum(w_i) over the batch's rows, as in scikit-learn and Keras.
        l2 : float, default 0
            Add the L2 penalty ``l2 / 2 * sum(W ** 2)`` over every weight (Dense and
            convolution kernels, embedding tables: not biases, not the normalisations'
            parameters) to the loss, so ``l2 * W`` to those gradients: scikit-learn's
            ``alpha`` is ``l2 = alpha / batch rows``.
            Unlike an optimizer's ``weight_decay`` it is part of the returned loss.
        clip_grad_norm : float, optional
            Scale the gradients so their global norm is at most this before the update.

        A step whose loss, gradients or update would not be finite raises
        FloatingPointError and changes nothing (weights, optimizer state, running
        statistics, dropout's count, gradients)."""
        clip = 0.0 if clip_grad_norm is None else float(clip_grad_norm)
        if clip_grad_norm is not None and not (clip > 0 and np.isfinite(clip)):
            raise ValueError(f"clip_grad_norm must be a finite number > 0, got {clip_grad_norm!r}")
        return self._engine.train_step(x, y, self.optimizer, rows, clip, False,
                                       sample_weight, l2)

    def compute_gradients(self, x, y, rows=None, *, sample_weight=None, l2=0.0, scale=1.0,
                          row_offset=0):
        """forward + loss + backward in one call, without the update: adds
        ``scale * dL/dparams`` to ``grads`` and returns the mean loss of the batch
        (``sample_weight`` and ``l2`` as in ``train_step``).

        For gradient accumulation and data-parallel training: with a global batch split
        between processes, give each process ``scale = its rows / global rows`` and
        ``row_offset`` = the global number of its first row (dropout masks are keyed by
        it), then sum the gradients (``backprop.distributed``) and ``step()``."""
        return self._engine.compute_gradients(x, y, rows, scale, row_offset, sample_weight,
                                              l2)

    def clip_grad_norm(self, max_norm):
        """Scale the gradients so their global norm is at most max_norm (as
        ``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping."""
        return self._engine.clip_grad_norm(max_norm)

    def loss_of(self, x, y):
        """The built-in loss of the network on (x, y), without touching gradients."""
        self._engine.forward(x)
        return self._engine.loss_value(y)

    def grad_norm(self):
        """The Euclidean norm of all gradients together."""
        return self._engine.grad_norm()

    def layer_grad_norms(self):
        """{name: norm} of each weight's gradient (the weights the layers declare, nested
        ones included, in the flat buffer's order), named by the layer's place:
        ``"layers[2].layers[0].weight"``."""
        return {name: float(np.linalg.norm(self.grads[offset:offset + size]))
                for name, (offset, size) in zip(self.weight_names(), self._plan.weights)}

    def weight_names(self):
        """The name of each weight, in the flat buffer's order: ``"layers[0].weight"``."""
        return [f"{self._plan.names[id(layer)]}.{name}" for layer, name in self._plan.weight_names]

    # ---- scikit-learn / Keras style training and inference

    def fit(self, X, y, *, epochs=10, batch_size=32, shuffle=True, validation_data=None,
            validation_split=0.0, early_stopping=None, lr_schedule=None, clip_grad_norm=None,
            progress=None, callbacks=(), comm=None):
        """Train on (X, y) for `epochs` passes in shuffled minibatches; returns the History.

        Parameters
        ----------
        X : ndarray of shape (n_samples, *input_shape)
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

        Training runs in train mode and validation in eval mode; the mode the network
        had is restored at the end.  Shuffling draws from ``net.rng`` (seeded by
        ``seed``), so training is reproducible, and resumable from a checkpoint.  If the
        loss stops being finite, fit raises ``FloatingPointError`` naming the epoch, step
        and first non-finite layer; the update of that step is not applied.
        """
        return training.fit(self, X, y, epochs=epochs, batch_size=batch_size, shuffle=shuffle,
                            validation_data=validation_data, validation_split=validation_split,
                            early_stopping=early_stopping, lr_schedule=lr_schedule,
                            clip_grad_norm=clip_grad_norm, progress=progress,
                            callbacks=callbacks, comm=comm)

    def predict(self, X, batch_size=1024):
        """Class labels for classifiers, raw outputs otherwise; computed in batches, in
        eval mode."""
        return training.predict(self, X, batch_size)

    def predict_proba(self, X, batch_size=1024):
        """Class probabilities (the softmax or sigmoid outputs); computed in batches, in
        eval mode."""
        if self.output_activation not in ("softmax", "sigmoid"):
            raise ValueError("predict_proba needs a softmax or sigmoid output, got "
                             f"{self.output_activation!r}; use predict")
        return training.predict_proba(self, X, batch_size)

    def evaluate(self, X, y, batch_size=1024):
        """{"loss": mean loss, "accuracy": fraction correct (classifiers)} on (X, y), in
        eval mode."""
        return training.evaluate(self, X, y, batch_size)

    # ---- persistence: checkpoints, pickling, copies

    def held(self):
        """``with net.held():`` waits for a step running in another thread, and keeps other
        threads from starting one until the block ends, so what the block reads of the
        network (weights, statistics, optimizer state) is all of one step boundary.
        Checkpoints, pickles and copies are taken this way.  Keep the block short: the
        other threads' passes wait for it."""
        return self._engine.held()

    def save(self, path):
        """Write a checkpoint atomically (see ``backprop.checkpoint``); a network whose
        parameters, buffers or optimizer state are not finite is refused."""
        record.save(self, path)

    @classmethod
    def load(cls, path):
        """A network restored from ``save``: weights, running statistics, optimizer state,
        mode, RNG and dropout counters, history.  Never executes code from the file."""
        return record.load(cls, path)

    def __reduce__(self):
        # Pickle and deepcopy go through the checkpoint's plain data (arrays + JSON-able
        # header), never through the compiled objects.
        header, arrays = record.to_record(self)
        return (record.rebuild, (type(self), header, arrays))

    def config(self):
        """The architecture as plain data (for checkpoints and copies)."""
        return record.network_config(self)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        precision = "" if self.precision == "float32" else f", precision={self.precision!r}"
        return (f"Network([\n  {inner}],\n  loss={self.loss!r}, optimizer={self.optimizer!r}, "
                f"dtype={self.dtype.name!r}{precision})")
