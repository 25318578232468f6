"""The command line: ``backprop train | evaluate | predict``.

Every mistake (a bad option, a missing or malformed file) ends with one line on stderr
and exit code 2, never a traceback.
"""
import argparse
import os
import sys
import time
import warnings
import zipfile

import numpy as np

import backprop as bp
from backprop import datasets, distributed
from backprop._userfiles import open_regular
from backprop.optim import OPTIMIZERS


# A class label above this is a mistake (a float of 1e30 would not even cast to int64).
MAX_LABEL = 2 ** 31 - 1


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):          # one line instead of usage + message
        raise UsageError(message)


# The named datasets' images: (channels, height, width) of a sample, for --model cnn.
IMAGES = {"digits": (1, 8, 8), "mnist-sample": (1, 28, 28), "fashion-mnist": (1, 28, 28)}


def load_dataset(name):
    """(X, y) of a named dataset, or of an .npz (arrays X and y) or .csv (label last) file.
    Fashion-MNIST is its training set followed by its test set (see train_test)."""
    if name == "digits":
        return datasets.load_digits()
    if name == "mnist-sample":
        return datasets.load_mnist_sample()
    if name == "fashion-mnist":
        (X, y), (Xt, yt) = datasets.load_fashion_mnist()
        return np.concatenate([X, Xt]), np.concatenate([y, yt])
    if name.endswith(".npz"):
        X, y = read_npz(name, "--dataset", ("X", "y"))
        return features(X, name, np.float32), y
    if name.endswith(".csv"):
        data = read_csv(name, "--dataset")
        if data.shape[1] < 2:
            raise UsageError(f"{name}: a .csv dataset needs feature columns and a label column")
        return features(data[:, :-1], name, np.float32), data[:, -1]
    raise UsageError(f"unknown dataset {name!r}: use digits, mnist-sample, fashion-mnist, "
                     "FILE.npz or FILE.csv")


def read_npz(path, option, names):
    """The arrays `names` of the .npz file at `path` (given as `option`)."""
    try:
        with open_regular(path, option) as fh, np.load(fh, allow_pickle=False) as f:
            if not all(name in f.files for name in names):
                raise UsageError(f"{path}: an .npz file here needs arrays named "
                                 f"{' and '.join(names)}, it has {sorted(f.files)}")
            return [f[name] for name in names]
    except (zipfile.BadZipFile, EOFError) as e:      # neither is an OSError or ValueError
        raise UsageError(f"{path}: not a readable .npz file (empty, truncated or "
                         f"corrupted?): {e}") from None
    except ValueError as e:                          # object arrays, a pickle, a bad member
        raise UsageError(f"{path}: {e}") from None


def read_csv(path, option):
    """The numbers of a comma-separated file (UTF-8, with or without a byte-order mark, as
    spreadsheet programs write it), one row per line."""
    with open_regular(path, option, encoding="utf-8-sig") as fh, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")   # said below
        try:
            data = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise UsageError(f"{path}: {e} (a .csv here holds numbers only, no header "
                             "row)") from None
    if data.size == 0:
        raise UsageError(f"{path}: the file holds no rows")
    return data


def _precision(net):
    if net.precision == "float32":
        return ""
    return f"products in {net.precision} ({bp.bfloat16_kernel()}), "


def features(X, name, dtype, sample_shape=None):
    """X in `dtype`, if it is a non-empty array of finite real numbers that `dtype` can
    hold, one sample per row: of shape (samples, *sample_shape), or (samples, features)
    when no model says.  A complex X is refused rather than cut to its real part, and a
    value too large is refused rather than made infinite (with a warning on stderr) and
    refused by the network after a header line."""
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise UsageError(f"{name}: X must hold real numbers, got dtype {X.dtype}")
    if sample_shape is None and (X.ndim != 2 or 0 in X.shape):
        raise UsageError(f"{name}: X must be a 2-D array of shape (samples, features) with "
                         f"at least one of each, got shape {X.shape}")
    if sample_shape is not None and (X.shape[1:] != tuple(sample_shape) or len(X) == 0):
        raise UsageError(f"{name}: the model takes samples of shape {tuple(sample_shape)}, "
                         f"at least one: X must have shape (samples, "
                         f"{', '.join(map(str, sample_shape))}), got {X.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = X.astype(dtype)
    bad = ~np.isfinite(converted.reshape(len(X), -1)).all(axis=1)
    if bad.any():
        raise UsageError(f"{name}: X holds NaN, Inf or a value too large for {np.dtype(dtype)} "
                         f"(first in row {np.flatnonzero(bad)[0]})")
    return converted


def class_labels(y, name):
    """y as int64 class labels (whole numbers >= 0), else a UsageError (a float label
    such as 0.7 is a mistake, not a class)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) == 0:
        raise UsageError(f"{name}: labels must be one non-empty column")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise UsageError(f"{name}: labels must be whole numbers (class 0, 1, ...), got "
                         f"{y[~(y == np.round(y))][:3].tolist()}")
    if y.dtype.kind not in "biuf" or y.min() < 0 or y.max() > MAX_LABEL:
        raise UsageError(f"{name}: labels must be whole numbers from 0 to {MAX_LABEL}")
    return y.astype(np.int64)


def every_class(labels, name):
    """The number of classes K of training labels, which must be 0..K-1, each present (a
    label of 1e9 is a mistake, not a billion classes)."""
    present = np.unique(labels)
    if len(present) != present[-1] + 1:
        gaps = np.flatnonzero(present != np.arange(len(present)))
        raise UsageError(f"{name}: labels must be the classes 0..K-1, each present; class "
                         f"{gaps[0]} never appears (largest label {present[-1]})")
    return len(present)


def parse_layers(text, n_features, n_classes):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or sizes[0] != n_features or sizes[-1] != n_classes or min(sizes) < 1:
        raise UsageError(f"--layers must be positive sizes starting with the {n_features} "
                         f"input features and ending with the {n_classes} classes, got {text!r}")
    return sizes


def cnn(image, n_classes, dropout=0.0):
    """--model cnn: two 3x3 convolutions (32 and 64 channels, zero-padded, relu), each
    followed by 2x2 max pooling, then Dense(128, relu), Dropout, and the softmax layer.
    For 28x28 images: (1, 28, 28) -> 32x28x28 -> 32x14x14 -> 64x14x14 -> 64x7x7 ->
    3136 -> 128 -> classes, about 420,000 parameters."""
    channels, height, width = image
    flat = 64 * (height // 4) * (width // 4)
    layers = [bp.Conv2d(channels, 32, 3, padding=1, activation="relu"), bp.MaxPool2d(2),
              bp.Conv2d(32, 64, 3, padding=1, activation="relu"), bp.MaxPool2d(2),
              bp.Flatten(), bp.Dense(flat, 128, activation="relu")]
    if dropout > 0:
        layers.append(bp.Dropout(dropout))
    return layers + [bp.Dense(128, n_classes, activation="softmax")]


# name -> (the function in backprop.demos, its default epochs)
DEMOS = {"vanishing-gradients": ("vanishing_gradients", 5),
         "vanishing-gradients-in-time": ("vanishing_gradients_in_time", 10)}


def build_parser():
    parser = Parser(prog="backprop", description="Train and use backprop networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="train on a dataset and report test accuracy")
    train.add_argument("--dataset", default="digits",
                       help="digits, mnist-sample, fashion-mnist, FILE.npz or FILE.csv "
                            "(default: %(default)s)")
    train.add_argument("--model", default="mlp", choices=["mlp", "cnn"],
                       help="mlp: Dense layers (--layers); cnn: two convolution + max-pooling "
                            "stages, Dense(128) and the output, for the image datasets "
                            "(default: %(default)s)")
    train.add_argument("--layers", help="mlp sizes from input to classes, e.g. 64,64,10 "
                                        "(default: input,128,classes)")
    train.add_argument("--activation", default="relu", choices=sorted(bp.ACTIVATIONS),
                       help="the hidden layers' activation (default: %(default)s)")
    train.add_argument("--batch-norm", action="store_true",
                       help="BatchNorm and the activation after each hidden Dense layer")
    train.add_argument("--dropout", type=float, default=0.0, metavar="P",
                       help="Dropout with probability P after each hidden layer "
                            "(default: %(default)s, none)")
    train.add_argument("--optimizer", default="Adam", choices=sorted(OPTIMIZERS),
                       help="(default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="learning rate (default: %(default)s)")
    train.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                       help="what the layers' products multiply: bfloat16 is mixed "
                            "precision (float32 weights and sums), as torch.autocast "
                            "(default: %(default)s)")
    train.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    train.add_argument("--test-size", type=float, default=0.2,
                       help="the fraction of rows held out to test on, not for "
                            "fashion-mnist, which has its own (default: %(default)s)")
    train.add_argument("--threads", type=int, default=0,
                       help="0: all available (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0,
                       help="seeds the weights, the split and the shuffling "
                            "(default: %(default)s)")
    train.add_argument("--save", metavar="FILE", help="save the trained model here (.npz)")
    train.add_argument("--plot", metavar="FILE.png",
                       help="draw the training curves here (needs matplotlib)")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar or per-epoch lines on stderr")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI: mpiexec -n 4 python -m backprop train "
                            "--distributed (needs mpi4py)")
    evaluate = commands.add_parser("evaluate", help="loss and accuracy of a saved model")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--dataset", required=True)
    demo = commands.add_parser("demo", help="demonstrations: " + ", ".join(DEMOS))
    demo.add_argument("name", choices=list(DEMOS))
    demo.add_argument("--epochs", type=int, help="epochs of training (default: the demo's)")
    demo.add_argument("--plot", metavar="FILE.png")
    predict = commands.add_parser("predict", help="predictions of a saved model")
    predict.add_argument("--model", required=True)
    predict.add_argument("--input", required=True, help=".npz (array X) or .csv of features")
    predict.add_argument("--output", help="write predictions here instead of stdout")
    return parser


def hidden_layers(sizes, activation, batch_norm=False, dropout=0.0):
    """Dense layers from sizes[0] to sizes[-2], each followed by its activation (through
    BatchNorm with batch_norm) and Dropout(dropout) when dropout > 0."""
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        if batch_norm:
            layers += [bp.Dense(a, b, bias=False), bp.BatchNorm(b), bp.Activation(activation)]
        else:
            layers.append(bp.Dense(a, b, activation=activation))
        if dropout > 0:
            layers.append(bp.Dropout(dropout))
    return layers


def train(args):
    if args.epochs < 1 or args.batch_size < 1 or not 0 < args.test_size < 1 or not (
            0 < args.lr < float("inf")):
        raise UsageError("--epochs and --batch-size must be >= 1, --lr > 0, 0 < --test-size < 1")
    if not 0 <= args.threads <= bp.MAX_THREADS:
        raise UsageError(f"--threads must be in [0, {bp.MAX_THREADS}] (0: all available), "
                         f"got {args.threads}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.model == "cnn" and args.dataset not in IMAGES:
        raise UsageError(f"--model cnn trains on the image datasets ({', '.join(IMAGES)}), "
                         f"not {args.dataset}")
    if args.model == "cnn" and (args.layers or args.batch_norm):
        raise UsageError("--layers and --batch-norm describe --model mlp")
    # With --distributed every rank runs this function; rank 0 alone prints and writes.
    comm = distributed.world() if args.distributed else None
    rank0 = comm is None or comm.rank == 0
    bp.set_num_threads(distributed.threads_per_rank(comm) if comm and not args.threads
                       else args.threads)
    with distributed.fail_together(comm, "loading the data"):
        if rank0:                       # before training, not after it
            for option, path in (("--save", args.save), ("--plot", args.plot)):
                check_output(option, path)
            check_plotting(args.plot)
        X, y = load_dataset(args.dataset)
        y = class_labels(y, args.dataset)
        if len(y) < 10:
            raise UsageError(f"{args.dataset}: {len(y)} rows are too few to split into "
                             "training, validation and test sets (10 at least)")
        n_classes = every_class(y, args.dataset)
        if args.model == "cnn":
            X = X.reshape((len(X),) + IMAGES[args.dataset])
            layers, shape = cnn(IMAGES[args.dataset], n_classes, args.dropout), "cnn"
        else:
            sizes = (parse_layers(args.layers, X.shape[1], n_classes) if args.layers
                     else [X.shape[1], 128, n_classes])
            layers = hidden_layers(sizes, args.activation, args.batch_norm, args.dropout)
            layers.append(bp.Dense(sizes[-2], sizes[-1], activation="softmax"))
            shape = "-".join(map(str, sizes))
        X_train, X_test, y_train, y_test = train_test(X, y, args)
        net = bp.Network(layers, loss="cross_entropy", input_shape=X.shape[1:],
                         optimizer=OPTIMIZERS[args.optimizer](lr=args.lr), seed=args.seed,
                         precision=args.precision)
    if rank0:
        processes = f"{comm.size} processes x " if comm else ""
        threads = bp.get_num_threads()
        # --batch-norm and --dropout change the network beyond the sizes `shape` shows.
        extras = ((" with batch-norm" if args.batch_norm else "")
                  + (f", dropout {args.dropout}" if args.dropout > 0 else ""))
        print(f"backprop: {args.dataset}, {len(X_train)} training / {len(X_test)} test samples, "
              f"network {shape}{extras}, {args.optimizer} lr={args.lr}, {_precision(net)}"
              f"{processes}{threads} thread{'s' * (threads != 1)}", file=sys.stderr)
    started = time.perf_counter()
    history = net.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                      validation_split=0.1, progress=not args.no_progress, comm=comm)
    seconds = time.perf_counter() - started
    with distributed.fail_together(comm, "evaluating or saving the model"):
        if rank0:
            report(net, history, seconds, X_test, y_test, args)


def train_test(X, y, args):
    """The training and test sets: Fashion-MNIST's own (its 10,000 test images, whatever
    --test-size), otherwise a stratified split of --test-size."""
    if args.dataset == "fashion-mnist":
        n = len(X) - 10_000
        return X[:n], X[n:], y[:n], y[n:]
    try:
        return datasets.train_test_split(X, y, test_size=args.test_size, seed=args.seed,
                                         stratify=True)
    except ValueError as e:
        raise UsageError(f"{args.dataset}: cannot split {len(y)} rows into training and "
                         f"test sets: {e}") from None


def check_output(option, path):
    """Refuse an output path that cannot be written (None: the option is not given)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: it is a folder; give a file name")


def check_plotting(path):
    """Refuse --plot when matplotlib cannot be imported (None: no --plot), so that a
    missing package is said before the training rather than after it."""
    if path is None:
        return
    try:
        import matplotlib               # noqa: F401 (only whether it imports)
    except ImportError:
        raise UsageError(f"--plot {path}: plotting needs matplotlib: "
                         "pip install matplotlib") from None


def report(net, history, seconds, X_test, y_test, args):
    """Rank 0's part of train: the test scores, the checkpoint, the plot."""
    scores = net.evaluate(X_test, y_test)
    samples = sum(s * t for s, t in zip(history.samples_per_second, history.seconds))
    print(f"test accuracy {scores['accuracy']:.4f}  test loss {scores['loss']:.4f}  "
          f"training {seconds:.2f} s  {samples / sum(history.seconds):,.0f} samples/s")
    if args.save:
        net.save(args.save)
        print(f"saved the model to {args.save}", file=sys.stderr)
    if args.plot:
        history.plot(args.plot)
        print(f"saved the training curves to {args.plot}", file=sys.stderr)


def demo(args):
    from backprop import demos
    function, epochs = DEMOS[args.name]
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be >= 1")
    check_output("--plot", args.plot)
    check_plotting(args.plot)
    getattr(demos, function)(epochs=args.epochs or epochs, plot=args.plot)


def targets(net, y, name):
    """The dataset's y as the targets net's loss takes: class labels for cross_entropy,
    rows of net.n_outputs numbers (a column for one output) for mse and
    binary_cross_entropy."""
    if net.loss == "cross_entropy":
        return class_labels(y, name)
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.dtype.kind not in "biuf" or y.ndim != 2 or y.shape[1] != net.n_outputs:
        raise UsageError(f"{name}: a model with loss {net.loss} and {net.n_outputs} outputs "
                         f"needs y of real numbers of shape (samples, {net.n_outputs})"
                         f"{' or (samples,)' * (net.n_outputs == 1)}, got {y.dtype} of shape "
                         f"{y.shape}")
    return y.astype(net.dtype)


def evaluate(args):
    net = bp.Network.load(args.model)
    if net.loss is None:
        raise UsageError(f"{args.model}: the model has no loss to evaluate; use predict")
    X, y = load_dataset(args.dataset)
    X = features(X.reshape((len(X),) + net.input_shape) if np.size(X) == len(X) * net.n_inputs
                 else X, args.dataset, net.dtype, net.input_shape)
    scores = net.evaluate(X, targets(net, y, args.dataset))
    # The model does not record train's split, so every row is scored: said, so that a
    # score over training rows is not taken for train's held-out test accuracy.
    print(f"backprop: {args.dataset}, all {len(X):,} rows scored (training rows included "
          "if the model was trained on this dataset)", file=sys.stderr)
    print("  ".join(f"{name} {value:.4f}" for name, value in scores.items()))


def predict(args):
    net = bp.Network.load(args.model)
    if args.input.endswith(".npz"):
        X, = read_npz(args.input, "--input", ("X",))
    else:
        X = read_csv(args.input, "--input")
    if np.size(X) == len(X) * net.n_inputs:          # rows of an image model's pixels
        X = np.reshape(X, (len(X),) + net.input_shape)
    labels = net.predict(features(X, args.input, net.dtype, net.input_shape))
    text = "\n".join(str(v) for v in labels.tolist()) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        {"train": train, "evaluate": evaluate, "predict": predict, "demo": demo}[args.command](args)
    except (UsageError, ValueError, TypeError, OSError, ImportError, ArithmeticError,
            distributed.DistributedError) as e:
        print(f"backprop: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"backprop: error: out of memory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backprop: interrupted", file=sys.stderr)
        return 130
    return 0
