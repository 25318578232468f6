"""The threads the kernels' parallel regions run on (backprop/_team.h).

GCC builds on Linux run every region on backprop's own team: parts claimed by whichever
thread is awake, idle threads that spin briefly and sleep at once while other processes
keep the CPUs busy.  These tests check what that must not change (the results, for any
team, any spin, threads running concurrently, a forked child) and what it promises (no
other call into the OpenMP runtime, no spinning while the CPUs are taken).
"""
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import backprop as bp
from backprop import _core
from conftest import threads

OWN_TEAM = _core._team_spin() != -1
pytestmark = pytest.mark.skipif(not OWN_TEAM, reason="this build runs its regions on the "
                                "compiler's OpenMP runtime (not GCC on Linux)")
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def product_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((300, 200), dtype=np.float32),
            rng.standard_normal((200, 260), dtype=np.float32))


def trained_weights(n_threads, epochs=2, seed=0):
    X, y = bp.datasets.load_digits()
    net = bp.Network([bp.Dense(64, 300, "relu"), bp.Dense(300, 10, "softmax")],
                     loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), seed=seed)
    with threads(n_threads):
        net.fit(X, y, epochs=epochs, batch_size=256, progress=False)
    return net.params.copy()


@pytest.mark.parametrize("module", ["engine", "kernels"])
def test_the_core_asks_the_openmp_runtime_only_for_its_thread_count(module):
    # Every region must enter through the kernels' own GOMP_parallel: a call into
    # libgomp's team (a dynamic schedule, a critical section, an atomic block) would
    # run on threads the team knows nothing about.  The engine runs no region at all
    # (a region there would start a second team).
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    path = _core.__file__ if module == "engine" else _core._kernels.__file__
    undefined = subprocess.run([nm, "-D", "--undefined-only", path],
                               capture_output=True, text=True, check=True).stdout
    asked = sorted({line.split()[-1].split("@")[0] for line in undefined.splitlines()
                    if "omp_" in line.lower()})
    assert asked == ["omp_get_max_threads"]
    if module == "engine":
        defined = subprocess.run([nm, "--defined-only", path],
                                 capture_output=True, text=True, check=True).stdout
        assert "GOMP_parallel" not in defined and "_omp_fn" not in defined


def test_no_parallel_loop_waits_at_more_than_one_barrier():
    # GOMP_barrier (_team.h) lets a part waiting at it run the parts nobody has started,
    # nested on its stack, up to their own barrier and on to their end: that is sound
    # only if a part passes one barrier at most (a nested part waiting at a second one
    # would wait for the part beneath it).  Cython's prange places one where a loop
    # variable is both firstprivate and lastprivate; a parallel block holding two loops
    # would place more.  Counted in the machine code of every outlined region.
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", _core._kernels.__file__],
                             capture_output=True, text=True, check=True).stdout
    barriers, function = {}, None
    for line in listing.splitlines():
        start = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if start:
            function = start.group(1)
        elif re.search(r"\b(call|jmp)\s+[0-9a-f]+ <GOMP_barrier>", line):
            barriers[function] = barriers.get(function, 0) + 1
    assert barriers, "no region calls GOMP_barrier (inlined, or the listing changed)"
    assert {f: n for f, n in barriers.items() if n > 1} == {}


def test_regions_run_on_helpers_and_give_the_product():
    a, b = product_inputs()
    with threads(2):
        out = bp.ops.matmul(a, b)
    assert _core._team_threads() >= 1
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


def test_results_do_not_depend_on_how_idle_threads_wait():
    a, b = product_inputs(1)
    try:
        _core._team_spin(0)                    # helpers sleep between regions
        assert _core._team_spin() == 0
        asleep_product, asleep_weights = bp.ops.matmul(a, b), trained_weights(2)
        _core._team_spin(10**9)                # helpers spin for a second
        awake_product, awake_weights = bp.ops.matmul(a, b), trained_weights(2)
    finally:
        _core._team_spin(-1)
    assert np.array_equal(asleep_product, awake_product)
    assert np.array_equal(asleep_weights, awake_weights)
    assert np.array_equal(asleep_weights, trained_weights(1))


def test_two_python_threads_train_at_once_with_the_results_of_one_after_the_other():
    # One of them has the helpers; the other runs its regions' parts in order itself.
    expected = [trained_weights(2, seed=s) for s in (0, 1)]
    got = [None, None]

    def train(i):
        got[i] = trained_weights(2, seed=i)

    workers = [threading.Thread(target=train, args=(i,)) for i in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def _child_product(queue):
    a, b = product_inputs()
    with threads(2):
        queue.put((bp.get_num_threads(), bp.ops.matmul(a, b), _core._team_threads()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork here")
def test_a_forked_child_runs_its_own_team():
    a, b = product_inputs()
    with threads(2):
        expected = bp.ops.matmul(a, b)         # the parent's helpers exist before the fork
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue,))
    child.start()
    count, product, helpers = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert count == 2 and helpers >= 1         # threads again, started in the child
    assert np.array_equal(product, expected)


def test_more_threads_than_cpus_never_spin():
    a, b = product_inputs()
    with threads(CPUS + 2):
        bp.ops.matmul(a, b)
        assert _core._team_spin() == 0         # a helper would spin on its caller's CPU


@pytest.mark.skipif(CPUS > 8, reason="keeping every CPU of a large machine busy")
def test_idle_threads_stop_spinning_while_other_processes_take_the_cpus():
    a, b = product_inputs()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(CPUS)]
    try:
        deadline = time.monotonic() + 5
        with threads(2):
            while _core._team_spin() != 0 and time.monotonic() < deadline:
                bp.ops.matmul(a, b)            # the caller looks every 10 ms
        assert _core._team_spin() == 0
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


FAILING_THREAD_STARTS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
typedef int (*start_fn)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
static int allowed = -1, calls = 0;        /* -1: every start succeeds */
void fail_thread_starts_after(int n) { allowed = n; calls = 0; }
int thread_starts(void) { return calls; }
int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
    static start_fn real = 0;
    if (!real) real = (start_fn)dlsym(RTLD_NEXT, "pthread_create");
    if (allowed >= 0 && ++calls > allowed) return EAGAIN;
    return real(t, a, f, arg);
}
"""

CHILD_WITH_FAILING_STARTS = r"""
import ctypes, numpy as np, backprop as bp
from backprop import _core
shim = ctypes.CDLL(None)
rng = np.random.default_rng(0)
a, b = rng.standard_normal((300, 200), dtype=np.float32), rng.standard_normal((200, 260), dtype=np.float32)
bp.set_num_threads(1)
alone = bp.ops.matmul(a, b)
bp.set_num_threads(8)
shim.fail_thread_starts_after(2)           # two helpers start, the third fails
first = bp.ops.matmul(a, b)
starts = shim.thread_starts()
again = bp.ops.matmul(a, b)
print(_core._team_threads(), starts, shim.thread_starts(),
      np.array_equal(first, alone), np.array_equal(again, alone))
"""


def test_a_thread_that_cannot_start_leaves_a_smaller_team_and_is_not_retried(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the failing pthread_create")
    source = tmp_path / "shim.c"
    source.write_text(FAILING_THREAD_STARTS)
    shim = tmp_path / "shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
                   check=True)
    # After any library already preloaded (AddressSanitizer's runtime must come first).
    env = dict(os.environ, LD_PRELOAD=f"{os.environ.get('LD_PRELOAD', '')} {shim}".strip(),
               OMP_NUM_THREADS="8")
    result = subprocess.run([sys.executable, "-c", CHILD_WITH_FAILING_STARTS], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    helpers, starts, starts_later, first_same, again_same = result.stdout.split()
    assert helpers == "2"                      # the two that started
    assert starts == "3"                       # the third was tried once ...
    assert starts_later == "3"                 # ... and not at the next region
    assert first_same == again_same == "True"  # the same product as one thread's


# The team alone (_team.h compiled into a program of its own), with its test seam set to
# pause where a region's steps can interleave badly: a helper that has read the ticket of
# a region whose parts are all claimed waits 50 us before reading the region's
# description, and the caller waits 200 us between describing the next region and opening
# its ticket.  Regions alternate between 2 and 8 parts, so the helper reads a part count
# larger than the part number its stale ticket names: before the caller closed the ticket
# first, its claim succeeded and ran that part of the next region a second time (and the
# caller then waited forever for a count of unfinished parts gone below zero).  Half the
# regions' parts wait at a barrier, and every part must find every other's mark after it
# (the old no-op barrier let a part through first).
TEAM_PROGRAM = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static __thread int is_caller = 0;
static void pause_at(const char* where) {
    if (strcmp(where, "before_open") == 0)
        usleep(200);
    else if (!is_caller)
        usleep(50);
}
#define BP_TEAM_PAUSE(where) pause_at(#where)
#include "_team.h"

#define REGIONS 300
static int runs[REGIONS][8];
static int index_of[REGIONS];

static int arrived_before[REGIONS][8], saw_every_part[REGIONS][8];

static void body(void* data) {
    __atomic_add_fetch(&runs[*(int*)data][omp_get_thread_num()], 1, __ATOMIC_RELAXED);
}

/* Each part marks its arrival, waits at the barrier, then looks for every part's mark. */
static void body_with_barrier(void* data) {
    int r = *(int*)data, me = omp_get_thread_num(), n = omp_get_num_threads(), p, all = 1;
    __atomic_store_n(&arrived_before[r][me], 1, __ATOMIC_RELAXED);
    GOMP_barrier();
    for (p = 0; p < n; p++)
        all &= __atomic_load_n(&arrived_before[r][p], __ATOMIC_RELAXED);
    saw_every_part[r][me] = all;
    __atomic_add_fetch(&runs[r][me], 1, __ATOMIC_RELAXED);
}

int main(void) {
    int i, p;
    is_caller = 1;
    alarm(60);                  /* a part run twice leaves the caller waiting forever */
    for (i = 0; i < REGIONS; i++) {
        int parts = i % 2 ? 8 : 2, barrier = i % 4 >= 2;
        index_of[i] = i;
        GOMP_parallel(barrier ? body_with_barrier : body, &index_of[i], parts, 0);
        for (p = 0; p < parts; p++) {
            if (runs[i][p] != 1) {
                printf("region %d: part %d ran %d times\n", i, p, runs[i][p]);
                return 1;
            }
            if (barrier && !saw_every_part[i][p]) {
                printf("region %d: part %d passed the barrier before every part came\n",
                       i, p);
                return 1;
            }
        }
    }
    printf("every part of %d regions ran once, none passed a barrier early\n", REGIONS);
    return 0;
}
"""


def test_a_helper_holding_a_stale_ticket_never_runs_a_part_of_the_next_region(tmp_path):
    compiler = shutil.which("gcc")
    if compiler is None or not OWN_TEAM:
        pytest.skip("the team is built only by GCC on Linux")
    source = tmp_path / "team.c"
    source.write_text(TEAM_PROGRAM)
    program = tmp_path / "team"
    subprocess.run([compiler, "-O2", "-D_OPENMP=201511", "-pthread",
                    "-I", os.path.dirname(bp.__file__), "-o", str(program), str(source)],
                   check=True)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ran once" in result.stdout, \
        (result.returncode, result.stdout)


def test_many_regions_of_changing_teams_while_helpers_sleep_and_wake():
    # Races between a region's end, the next one's start and helpers going to sleep or
    # waking late: thousands of short regions, teams of 2 to 9, helpers alternately
    # spinning and sleeping at once, two Python threads at a time; every product must be
    # the one-thread product.
    rng = np.random.default_rng(7)
    shapes = [(int(m), int(k), int(n)) for m, k, n in rng.integers(130, 260, size=(12, 3))]
    operands = [(rng.standard_normal((m, k), dtype=np.float32),
                 rng.standard_normal((k, n), dtype=np.float32)) for m, k, n in shapes]
    with threads(1):
        expected = [bp.ops.matmul(a, b) for a, b in operands]
    wrong = []

    def hammer(seed):
        order = np.random.default_rng(seed)
        for _ in range(300):
            i = int(order.integers(len(operands)))
            got = bp.ops.matmul(*operands[i])
            if not np.array_equal(got, expected[i]):
                wrong.append(i)

    try:
        for round_ in range(6):
            _core._team_spin(0 if round_ % 2 else -1)
            with threads(int(rng.integers(2, 10))):
                workers = [threading.Thread(target=hammer, args=(round_ * 2 + j,))
                           for j in range(2)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join(timeout=120)
    finally:
        _core._team_spin(-1)
    assert wrong == []
