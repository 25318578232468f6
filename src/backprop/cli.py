"""The command line: ``backprop train | evaluate | predict``.

Every mistake (a bad option, a missing or malformed file) ends with one line on stderr
and exit code 2, never a traceback.
"""
import argparse
import sys
import time

import numpy as np

import backprop as bp
from backprop import datasets
from backprop.optim import OPTIMIZERS


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):          # one line instead of usage + message
        raise UsageError(message)


def load_dataset(name):
    """(X, y) of a named dataset, or of an .npz (arrays X and y) or .csv (label last) file."""
    if name == "digits":
        return datasets.load_digits()
    if name == "mnist-sample":
        return datasets.load_mnist_sample()
    if name == "fashion-mnist":
        (X, y), (Xt, yt) = datasets.load_fashion_mnist()
        return np.concatenate([X, Xt]), np.concatenate([y, yt])
    if name.endswith(".npz"):
        with np.load(name, allow_pickle=False) as f:
            if "X" not in f.files or "y" not in f.files:
                raise UsageError(f"{name}: an .npz dataset needs arrays named X and y")
            return f["X"].astype(np.float32), f["y"]
    if name.endswith(".csv"):
        data = np.loadtxt(name, delimiter=",", dtype=np.float64, ndmin=2)
        if data.shape[1] < 2:
            raise UsageError(f"{name}: a .csv dataset needs feature columns and a label column")
        return data[:, :-1].astype(np.float32), data[:, -1]
    raise UsageError(f"unknown dataset {name!r}: use digits, mnist-sample, fashion-mnist, "
                     "FILE.npz or FILE.csv")


def class_labels(y, name):
    """y as int64 class labels 0..K-1, every class present; else a UsageError (a float
    label such as 0.7, or a label of 1e9, is a mistake, not a class)."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) == 0:
        raise UsageError(f"{name}: labels must be one non-empty column")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise UsageError(f"{name}: labels must be whole numbers (class 0, 1, ...), got "
                         f"{y[~(y == np.round(y))][:3].tolist()}")
    if y.dtype.kind not in "iuf" or y.min() < 0:
        raise UsageError(f"{name}: labels must be whole numbers >= 0")
    labels = y.astype(np.int64)
    present = np.unique(labels)
    if len(present) != present[-1] + 1:
        gaps = np.flatnonzero(present != np.arange(len(present)))
        raise UsageError(f"{name}: labels must be the classes 0..K-1, each present; class "
                         f"{gaps[0]} never appears (largest label {present[-1]})")
    return labels


def parse_layers(text, n_features, n_classes):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or sizes[0] != n_features or sizes[-1] != n_classes:
        raise UsageError(f"--layers must start with the {n_features} input features and end "
                         f"with the {n_classes} classes, got {text!r}")
    return sizes


def build_parser():
    parser = Parser(prog="backprop", description="Train and use backprop networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="train on a dataset and report test accuracy")
    train.add_argument("--dataset", default="digits")
    train.add_argument("--layers", help="sizes from input to classes, e.g. 64,64,10 "
                                        "(default: input,128,classes)")
    train.add_argument("--activation", default="relu", choices=sorted(bp.ACTIVATIONS))
    train.add_argument("--batch-norm", action="store_true",
                       help="BatchNorm and the activation after each hidden Dense layer")
    train.add_argument("--dropout", type=float, default=0.0, metavar="P",
                       help="Dropout with probability P after each hidden layer")
    train.add_argument("--optimizer", default="Adam", choices=sorted(OPTIMIZERS))
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--test-size", type=float, default=0.2)
    train.add_argument("--threads", type=int, default=0, help="0: all available")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save", metavar="FILE")
    train.add_argument("--plot", metavar="FILE.png")
    train.add_argument("--no-progress", action="store_true")
    evaluate = commands.add_parser("evaluate", help="loss and accuracy of a saved model")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--dataset", required=True)
    demo = commands.add_parser("demo", help="demonstrations: vanishing-gradients")
    demo.add_argument("name", choices=["vanishing-gradients"])
    demo.add_argument("--epochs", type=int, default=5)
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
    bp.set_num_threads(args.threads)
    X, y = load_dataset(args.dataset)
    y = class_labels(y, args.dataset)
    if len(y) < 10:
        raise UsageError(f"{args.dataset}: {len(y)} rows are too few to split into training, "
                         "validation and test sets (10 at least)")
    n_classes = int(y.max()) + 1
    sizes = (parse_layers(args.layers, X.shape[1], n_classes) if args.layers
             else [X.shape[1], 128, n_classes])
    try:
        X_train, X_test, y_train, y_test = datasets.train_test_split(
            X, y, test_size=args.test_size, seed=args.seed, stratify=True)
    except ValueError as e:
        raise UsageError(f"{args.dataset}: cannot split {len(y)} rows into training and test "
                         f"sets: {e}") from None
    layers = hidden_layers(sizes, args.activation, args.batch_norm, args.dropout)
    layers.append(bp.Dense(sizes[-2], sizes[-1], activation="softmax"))
    net = bp.Network(layers, loss="cross_entropy",
                     optimizer=OPTIMIZERS[args.optimizer](lr=args.lr), seed=args.seed)
    print(f"backprop: {args.dataset}, {len(X_train)} training / {len(X_test)} test samples, "
          f"network {'-'.join(map(str, sizes))}, {args.optimizer} lr={args.lr}, "
          f"{bp.get_num_threads()} threads", file=sys.stderr)
    started = time.perf_counter()
    history = net.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                      validation_split=0.1, progress=not args.no_progress)
    seconds = time.perf_counter() - started
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
    from backprop.demos import vanishing_gradients
    if args.epochs < 1:
        raise UsageError("--epochs must be >= 1")
    vanishing_gradients(epochs=args.epochs, plot=args.plot)


def evaluate(args):
    net = bp.Network.load(args.model)
    X, y = load_dataset(args.dataset)
    y = class_labels(y, args.dataset)
    scores = net.evaluate(X, y)
    print("  ".join(f"{name} {value:.4f}" for name, value in scores.items()))


def predict(args):
    net = bp.Network.load(args.model)
    if args.input.endswith(".npz"):
        with np.load(args.input, allow_pickle=False) as f:
            if "X" not in f.files:
                raise UsageError(f"{args.input}: needs an array named X")
            X = f["X"]
    else:
        X = np.loadtxt(args.input, delimiter=",", ndmin=2)
    labels = net.predict(X.astype(net.dtype))
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
    except (UsageError, ValueError, TypeError, OSError, ImportError, ArithmeticError) as e:
        print(f"backprop: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"backprop: error: out of memory: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backprop: interrupted", file=sys.stderr)
        return 130
    return 0
