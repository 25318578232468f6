"""The command line, run as a user would run it."""
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "backprop", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_default_train_on_digits_reaches_97_percent(tmp_path):
    result = run("train", "--no-progress", "--save", str(tmp_path / "m.npz"),
                 "--plot", str(tmp_path / "curves.png"))
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy")[1].split()[0])
    assert accuracy >= 0.97
    assert "samples/s" in result.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    again = run("evaluate", "--model", str(tmp_path / "m.npz"), "--dataset", "digits")
    assert again.returncode == 0, again.stderr
    assert "accuracy" in again.stdout


def test_predict_writes_one_label_per_row(tmp_path):
    assert run("train", "--no-progress", "--epochs", "2", "--save", str(tmp_path / "m.npz")).returncode == 0
    np.savez(tmp_path / "x.npz", X=np.zeros((5, 64), dtype=np.float32))
    result = run("predict", "--model", str(tmp_path / "m.npz"), "--input", str(tmp_path / "x.npz"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 5 and all(0 <= int(v) < 10 for v in result.stdout.split())


def test_a_cnn_trains_on_the_digits_images_and_predicts_from_rows_of_pixels(tmp_path):
    # --model cnn on the 8x8 digits: two conv + pool stages (8 -> 4 -> 2), Dense(256, 128).
    result = run("train", "--model", "cnn", "--no-progress", "--epochs", "6",
                 "--save", str(tmp_path / "cnn.npz"))
    assert result.returncode == 0, result.stderr
    assert "network cnn" in result.stderr
    assert float(result.stdout.split("test accuracy")[1].split()[0]) >= 0.95
    np.savez(tmp_path / "x.npz", X=np.zeros((3, 64), dtype=np.float32))    # flat rows
    predicted = run("predict", "--model", str(tmp_path / "cnn.npz"),
                    "--input", str(tmp_path / "x.npz"))
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.split()) == 3
    scores = run("evaluate", "--model", str(tmp_path / "cnn.npz"), "--dataset", "digits")
    assert scores.returncode == 0 and "accuracy" in scores.stdout, scores.stderr


@pytest.mark.parametrize("args", [
    ("train", "--model", "cnn", "--dataset", "FILE.csv"),
    ("train", "--model", "cnn", "--layers", "64,10"),
    ("train", "--model", "transformer"),
    ("train", "--epochs", "zero"),
    ("train", "--dataset", "nope"),
    ("train", "--layers", "3,4"),
    ("train", "--optimizer", "Adamax"),
    ("train", "--epochs", "0"),
    ("evaluate", "--model", "missing.npz", "--dataset", "digits"),
    ("frobnicate",),
])
def test_bad_options_give_one_line_and_exit_2(args, tmp_path):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    if "--model" in args and "train" in args:          # refused for what it says, not later
        assert "--model" in result.stderr or "describe --model mlp" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("backprop: error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [("train", "--epochs", "1", "--no-progress"),
                                     ("demo", "vanishing-gradients", "--epochs", "1")])
def test_plot_without_matplotlib_is_refused_before_training(command, tmp_path, monkeypatch,
                                                            capsys):
    from backprop import cli
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` fails
    assert cli.main([*command, "--plot", str(tmp_path / "curves.png")]) == 2
    out, err = capsys.readouterr()
    # One line, and no header, score or demo table: nothing was trained.
    assert err.count("\n") == 1 and err.startswith("backprop: error:"), err
    assert "pip install matplotlib" in err
    assert out == ""


def test_evaluate_says_it_scored_every_row_training_rows_included(tmp_path, capsys):
    # evaluate cannot know which rows train held out (the model does not record the
    # split), so it scores them all and must say so rather than pass for a test score.
    import backprop as bp
    from backprop import cli
    net = bp.Network([bp.Dense(64, 10, activation="softmax")], loss="cross_entropy", seed=0)
    net.save(str(tmp_path / "m.npz"))
    assert cli.main(["evaluate", "--model", str(tmp_path / "m.npz"), "--dataset", "digits"]) == 0
    out, err = capsys.readouterr()
    assert "accuracy" in out
    assert "all 1,797 rows" in err and "training rows included" in err, err


def test_train_help_shows_the_defaults():
    result = run("train", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())          # argparse wraps the help lines
    for default in ("(default: digits)", "(default: relu)", "(default: Adam)",
                    "(default: 0.001)", "(default: 30)", "(default: 32)", "(default: 0.2)",
                    "(default: 0.0, none)"):
        assert default in text, default


@pytest.mark.parametrize("options, says", [
    (("--batch-norm", "--dropout", "0.25", "--threads", "1"),
     ("with batch-norm", "dropout 0.25", "1 thread\n")),
    (("--threads", "2"), ("2 threads\n",)),
])
def test_the_train_header_says_batch_norm_dropout_and_threads(options, says, capsys):
    from backprop import cli
    assert cli.main(["train", "--epochs", "1", "--no-progress", *options]) == 0
    header = capsys.readouterr().err.splitlines()[0] + "\n"
    for words in says:
        assert words in header, header
    if "--batch-norm" not in options:
        assert "batch-norm" not in header and "dropout" not in header, header
