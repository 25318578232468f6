"""Scenarios for tests/test_distributed.py, run on every rank by
``mpiexec -n 2 python tests/mpi/worker.py SCENARIO [DIR]``.

Each rank writes what the test asserts on as JSON lines to
``$BACKPROP_MPI_RESULTS/rank<r>.jsonl``.  Every rank
also trains the single-process reference itself (the same seed and data give the same
result on any rank), so the comparison needs no communication.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
# scenario_different_simd: rank 1 imports the generic build (the level is chosen at import).
if sys.argv[1:2] == ["different_simd"] and MPI.COMM_WORLD.rank == 1:
    os.environ["BACKPROP_SIMD"] = "generic"

import backprop as bp
from backprop.distributed import DistributedError, allreduce_gradients, fail_together
from backprop.schedules import ReduceLROnPlateau

comm = MPI.COMM_WORLD


def report(**values):
    """One JSON line for the test, in this rank's own file: the ranks' stdout streams are
    merged by mpiexec, and some MPIs cut long lines apart when they do."""
    path = os.path.join(os.environ["BACKPROP_MPI_RESULTS"], f"rank{comm.rank}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"rank": comm.rank, "size": comm.size, **values}) + "\n")


def data(n=103, features=10, classes=3, seed=7):
    """A small 3-class problem: labels from a fixed linear rule, so training makes progress."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features))
    y = (X @ rng.normal(size=(features, classes))).argmax(axis=1)
    return X, y


def network(optimizer=None, seed=0, dropout=False):
    layers = [bp.Dense(10, 16, activation="tanh")]
    if dropout:
        layers.append(bp.Dropout(0.3))
    layers += [bp.Dense(16, 12, activation="relu"), bp.Dense(12, 3, activation="softmax")]
    return bp.Network(layers, loss="cross_entropy", optimizer=optimizer or bp.Adam(lr=0.01),
                      dtype="float64", seed=seed)


def relative_difference(a, b):
    """max |a - b| / max |b|: the weights' worst difference on the scale of the weights."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def checksum(net_or_array):
    """A number that changes with any bit of the weights (or of the array)."""
    array = getattr(net_or_array, "params", net_or_array)
    return int(np.frombuffer(array.tobytes(), dtype=np.uint8).astype(np.uint64)
               @ np.arange(1, array.nbytes + 1, dtype=np.uint64) % 2**61)


def images(n=103, shape=(1, 8, 7), classes=3, seed=7):
    """Small images whose labels follow a fixed linear rule of their pixels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n,) + shape)
    y = (X.reshape(n, -1) @ rng.normal(size=(X[0].size, classes))).argmax(axis=1)
    return X, y


def compare(make, dataset=data, **fit_args):
    """Train make() in one process and over comm with the same arguments."""
    X, y = dataset()
    single, parallel = make(), make()
    h1 = single.fit(X, y, progress=False, **fit_args)
    h2 = parallel.fit(X, y, comm=comm, progress=False, **fit_args)
    report(relative=relative_difference(parallel.params, single.params), checksum=checksum(parallel),
           epochs=[h1.epochs, h2.epochs], loss=[h1.loss, h2.loss],
           val_loss=[h1.val_loss, h2.val_loss], lr=[h1.lr, h2.lr],
           grad_norms=[h1.grad_norms, h2.grad_norms], history=h2.to_dict())


def scenario_equal(batch_size, optimizer):
    optimizers = {"adam": lambda: bp.Adam(lr=0.01),
                  "sgd": lambda: bp.SGD(lr=0.1, momentum=0.9, nesterov=True)}
    compare(lambda: network(optimizers[optimizer]()), epochs=6, batch_size=int(batch_size))


def scenario_decisions():
    # Validation, a plateau schedule that halves the learning rate, clipping that binds
    # (norm 0.2, below the first layer's gradient norm alone in every epoch) and early
    # stopping with patience 2.  In one process these settings run 4 of the 12 epochs,
    # the learning rate halved after epoch 3: the test checks both happen over MPI too.
    def make():
        net = network(bp.SGD(lr=0.5, momentum=0.9))
        net.schedule = ReduceLROnPlateau(net.optimizer, factor=0.5, patience=0)
        return net
    X, y = data()
    single, parallel = make(), make()
    common = dict(epochs=12, batch_size=16, validation_split=0.25, early_stopping=2,
                  clip_grad_norm=0.2, progress=False)
    h1 = single.fit(X, y, lr_schedule=single.schedule, **common)
    h2 = parallel.fit(X, y, lr_schedule=parallel.schedule, comm=comm, **common)
    report(relative=relative_difference(parallel.params, single.params), checksum=checksum(parallel),
           epochs=[h1.epochs, h2.epochs], loss=[h1.loss, h2.loss],
           val_loss=[h1.val_loss, h2.val_loss], val_accuracy=[h1.val_accuracy, h2.val_accuracy],
           lr=[h1.lr, h2.lr], grad_norms=[h1.grad_norms, h2.grad_norms])


def scenario_dropout():
    compare(lambda: network(dropout=True), epochs=4, batch_size=10)


def scenario_cnn():
    """Convolutions, pooling and Dropout (masks keyed by the global row) on images."""
    from cnn_oracle import small_cnn
    compare(lambda: small_cnn(dtype="float64", optimizer=bp.Adam(lr=0.01)), dataset=images,
            epochs=3, batch_size=12)


def sequences(n=103, shape=(6, 4), classes=3, seed=7):
    """Short sequences whose labels follow a fixed linear rule of their values."""
    return images(n, shape, classes, seed)


def scenario_recurrent():
    """An LSTM and a GRU stack: backpropagation through time splits by samples like any
    layer (each rank's rows are whole sequences)."""
    def make():
        return bp.Network([bp.LSTM(4, 8), bp.GRU(8, 6, num_layers=2), bp.LastStep(),
                           bp.Dense(6, 3, activation="softmax")], loss="cross_entropy",
                          optimizer=bp.Adam(lr=0.01), dtype="float64", seed=0,
                          input_shape=(6, 4))
    compare(make, dataset=sequences, epochs=3, batch_size=12)


def scenario_bfloat16():
    """bfloat16 products in a float32 network (a dense and a recurrent layer)."""
    def make():
        return bp.Network([bp.LSTM(4, 16), bp.LastStep(), bp.Dense(16, 16, activation="relu"),
                           bp.Dense(16, 3, activation="softmax")], loss="cross_entropy",
                          optimizer=bp.Adam(lr=0.01), seed=0, input_shape=(6, 4),
                          precision="bfloat16")
    compare(make, dataset=lambda: tuple(a.astype(np.float32) if a.dtype.kind == "f" else a
                                        for a in sequences()), epochs=3, batch_size=12)


def scenario_batchnorm():
    """BatchNorm over MPI: local batch statistics in training, running statistics averaged
    over the ranks after each epoch."""
    def make(lr):
        return bp.Network([bp.Dense(10, 16), bp.BatchNorm(16), bp.Activation("relu"),
                           bp.Dense(16, 3, activation="softmax")], loss="cross_entropy",
                          optimizer=bp.SGD(lr=lr), dtype="float64", seed=0)
    X, y = data(n=96)
    trained = make(0.1)
    history = trained.fit(X, y, epochs=3, batch_size=16, validation_split=0.25, comm=comm,
                          progress=False)
    # With the weights held still (lr 0) and shares of 8 + 8 rows, the running mean is a
    # moving average of batch means that is linear in them, so the average of the ranks'
    # running means equals one process's.
    single, parallel = make(0.0), make(0.0)
    single.fit(X, y, epochs=2, batch_size=16, progress=False)
    parallel.fit(X, y, epochs=2, batch_size=16, comm=comm, progress=False)
    report(checksum=checksum(trained), buffers=checksum(trained.buffers), val_loss=history.val_loss,
           running_mean=relative_difference(parallel.layers[1].running_mean,
                                            single.layers[1].running_mean))


def scenario_own_loop():
    """allreduce_gradients in a hand-written loop: each rank backpropagates its half of
    the batch, the average of the two means is the mean over the batch."""
    X, y = data(n=64)
    single, parallel = network(bp.SGD(lr=0.2)), network(bp.SGD(lr=0.2))
    start, stop = bp.distributed.share(16, comm.rank, comm.size)
    for batch in range(0, 64, 16):
        single.train_step(X[batch:batch + 16], y[batch:batch + 16])
        parallel.forward(X[batch + start:batch + stop])
        parallel.backward(y[batch + start:batch + stop])
        allreduce_gradients(parallel, comm)
        parallel.step()
        parallel.zero_grad()
    report(relative=relative_difference(parallel.params, single.params), checksum=checksum(parallel))


def scenario_resume(directory):
    """2 epochs over MPI, a checkpoint written by rank 0, loaded on every rank, 2 more
    epochs: the same as 4 epochs in one process."""
    X, y = data()
    single = network()
    single.fit(X, y, epochs=4, batch_size=8, progress=False)
    parallel = network()
    parallel.fit(X, y, epochs=2, batch_size=8, comm=comm, progress=False)
    path = f"{directory}/model.npz"
    with fail_together(comm, "saving"):
        if comm.rank == 0:
            parallel.save(path)
    comm.Barrier()
    resumed = bp.Network.load(path)
    resumed.fit(X, y, epochs=2, batch_size=8, comm=comm, progress=False)
    report(relative=relative_difference(resumed.params, single.params), checksum=checksum(resumed),
           epochs=resumed.epoch)


def scenario_memmap(directory):
    """Every rank reads the same .npy files memory-mapped, read-only."""
    X, y = data()
    with fail_together(comm, "writing the data"):
        if comm.rank == 0:
            np.save(f"{directory}/X.npy", X)
            np.save(f"{directory}/y.npy", y)
    comm.Barrier()
    X_map = np.load(f"{directory}/X.npy", mmap_mode="r")
    y_map = np.load(f"{directory}/y.npy", mmap_mode="r")
    single, parallel = network(), network()
    single.fit(X, y, epochs=3, batch_size=8, progress=False)
    parallel.fit(X_map, y_map, epochs=3, batch_size=8, comm=comm, progress=False)
    report(relative=relative_difference(parallel.params, single.params), checksum=checksum(parallel),
           memmap=isinstance(X_map, np.memmap) and not X_map.flags.writeable)


def expect_failure(run):
    """Run a failing fit; report which error this rank raised, and its message."""
    try:
        run()
    except (DistributedError, FloatingPointError) as error:
        report(error=type(error).__name__, message=str(error))
    else:
        report(error=None, message="")


def damage_after_epoch_1(array, value):
    """A callback that overwrites rank 1's copy of `array` after epoch 1, as if its file
    were damaged.  (Damaged before fit, the data would fail fit's fingerprint check, which
    compares a sample of the rows across ranks; scenario_different_data tests that.)"""
    def damage(net, epoch, logs):
        if comm.rank == 1 and epoch == 1:
            array[...] = value
    return damage


def scenario_bad_data():
    X, y = data()
    net = network()
    expect_failure(lambda: net.fit(X, y, epochs=3, batch_size=8, comm=comm, progress=False,
                                   callbacks=[damage_after_epoch_1(X, np.nan)]))
    report(epoch=net.epoch, passes=net._engine.passes, checksum=checksum(net))


def scenario_callback_raises():
    def flaky(net, epoch, logs):
        if comm.rank == 1 and epoch == 2:
            raise OSError("disk full while writing the epoch log")
    X, y = data()
    net = network()
    expect_failure(lambda: net.fit(X, y, epochs=4, batch_size=8, comm=comm, progress=False,
                                   callbacks=[flaky]))
    report(epoch=net.epoch)


def scenario_diverges():
    # Regression targets of 1e200 on rank 1: finite, so accepted, but the squared error
    # (1e400) overflows to inf on rank 1's rows only.
    X, _ = data()
    y = X[:, :2].copy()
    net = bp.Network([bp.Dense(10, 8, activation="tanh"), bp.Dense(8, 2)], loss="mse",
                     optimizer=bp.SGD(lr=0.05), dtype="float64", seed=0)
    after_epoch_1 = []
    callbacks = [damage_after_epoch_1(y, 1e200),
                 lambda net, epoch, logs: after_epoch_1.append(net.params.copy())]
    expect_failure(lambda: net.fit(X, y, epochs=3, batch_size=8, comm=comm, progress=False,
                                   callbacks=callbacks))
    report(epoch=net.epoch, unchanged=bool(np.array_equal(after_epoch_1[-1], net.params)),
           grads_zero=not net.grads.any(), passes=net._engine.passes)


def scenario_update_overflows():
    # Finite gradients, but after epoch 1 a learning rate of 1e308 makes the update itself
    # overflow, on every rank alike (they hold the same weights and summed gradients).
    X, _ = data()
    y = X[:, :2] * 1e3
    net = bp.Network([bp.Dense(10, 8, activation="tanh"), bp.Dense(8, 2)], loss="mse",
                     optimizer=bp.SGD(lr=1e-6, momentum=0.5), dtype="float64", seed=0)
    after_epoch_1 = []

    def overflow_next(net, epoch, logs):
        after_epoch_1.append([net.params.copy(), net.optimizer.steps,
                              net.optimizer.state["momentum_buffer"].copy()])
        net.optimizer.lr = 1e308

    expect_failure(lambda: net.fit(X, y, epochs=3, batch_size=8, comm=comm, progress=False,
                                   callbacks=[overflow_next]))
    params, steps, momentum = after_epoch_1[-1]
    report(epoch=net.epoch, unchanged=bool(np.array_equal(params, net.params)
                                           and steps == net.optimizer.steps and np.array_equal(
                                               momentum, net.optimizer.state["momentum_buffer"])),
           finite=bool(np.isfinite(net.params).all()), grads_zero=not net.grads.any())


def scenario_different_seed():
    X, y = data()
    expect_failure(lambda: network(seed=comm.rank).fit(X, y, epochs=1, comm=comm, progress=False))


def scenario_different_length():
    X, y = data(n=103 - comm.rank)
    expect_failure(lambda: network().fit(X, y, epochs=1, comm=comm, progress=False))


def scenario_different_data():
    X, y = data(seed=7 + comm.rank)
    expect_failure(lambda: network().fit(X, y, epochs=1, comm=comm, progress=False))


def scenario_different_simd():
    X, y = data()
    expect_failure(lambda: network().fit(X, y, epochs=1, comm=comm, progress=False))
    report(simd=bp.simd_kernel())


def scenario_different_optimizer_state():
    """The same weights, but rank 1's Adam has taken a step (its state differs)."""
    X, y = data()
    net = network()
    if comm.rank == 1:
        params = net.params.copy()
        net.train_step(X[:8], y[:8])
        net.params[...] = params
    expect_failure(lambda: net.fit(X, y, epochs=1, comm=comm, progress=False))


def scenario_different_architecture():
    """The same layer sizes with two activations swapped on rank 1."""
    X, y = data()
    first, second = ("tanh", "relu") if comm.rank == 0 else ("relu", "tanh")
    net = bp.Network([bp.Dense(10, 16, activation=first), bp.Dense(16, 12, activation=second),
                      bp.Dense(12, 3, activation="softmax")], loss="cross_entropy",
                     optimizer=bp.Adam(lr=0.01), dtype="float64", seed=0)
    expect_failure(lambda: net.fit(X, y, epochs=1, comm=comm, progress=False))


def scenario_stop():
    """A callback that stops training on rank 1 only stops every rank."""
    def stop(net, epoch, logs):
        if comm.rank == 1 and epoch == 2:
            net.stop_training = True
    X, y = data()
    net = network()
    net.fit(X, y, epochs=5, batch_size=8, comm=comm, progress=False, callbacks=[stop])
    report(epoch=net.epoch, checksum=checksum(net))


def scenario_uncaught():
    """No try/except: every rank must end with the error, none must hang."""
    def flaky(net, epoch, logs):
        if comm.rank == 1:
            raise RuntimeError("callback failed")
    X, y = data()
    network().fit(X, y, epochs=2, comm=comm, progress=False, callbacks=[flaky])


def scenario_progress():
    """progress=True without tqdm: one line per epoch on stderr, from rank 0 only."""
    import backprop.progress
    backprop.progress.tqdm = None
    X, y = data()
    network().fit(X, y, epochs=3, batch_size=8, comm=comm, progress=True)


def scenario_killed():
    """Rank 1 dies outright in epoch 2 (no exception, no MPI call): the MPI runtime must
    end rank 0, which would otherwise wait in the next collective."""
    import os

    def die(net, epoch, logs):
        if comm.rank == 1 and epoch == 2:
            os._exit(3)
    X, y = data()
    network().fit(X, y, epochs=5, comm=comm, progress=False, callbacks=[die])


def scenario_api_errors():
    """Bad arguments raise before any collective, on the rank that passed them."""
    X, y = data()
    errors = {}
    for name, call in {
        "fit_comm": lambda: network().fit(X, y, epochs=1, comm="COMM_WORLD"),
        "allreduce_comm": lambda: allreduce_gradients(network(), None),
    }.items():
        try:
            call()
        except TypeError as error:
            errors[name] = str(error)
    report(errors=errors)


SCENARIOS = {name[len("scenario_"):]: f for name, f in globals().items()
             if name.startswith("scenario_")}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
