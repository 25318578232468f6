"""The Engine's choice between its whole team and one thread (_engine.pxi, TeamChoice):
on an idle machine it keeps the team and rarely tries one thread; when the team's passes
become dearer (a busy machine: descheduled partners make every region wait) it moves to
one thread within a few passes and tries the team again more and more rarely; and the
results never depend on the choice (the thread-count tests cover that)."""
import numpy as np

import backprop as bp
from backprop import _core


def trial_starts(ran, value=True):
    """The passes where a run of `value` (one thread: True) begins."""
    ran = np.asarray(ran)
    return np.flatnonzero((ran == value) & np.r_[True, ran[:-1] != value])


def test_an_idle_machine_keeps_the_team_and_tries_one_thread_rarely():
    ran = _core._simulate_team_choice(1.0, 1.6, 5000)       # the team 1.6x faster
    trials = trial_starts(ran)
    assert sum(ran) == 2 * len(trials)                       # each trial: two passes
    assert len(trials) <= 12                                 # they back off: 4, 8, ... 1024
    assert np.diff(trials)[-1] == 1024 + 1


def test_a_busy_machine_moves_to_one_thread_within_a_few_passes():
    ran = _core._simulate_team_choice(20.0, 1.0, 2000)      # the team 20x dearer
    first = ran.index(True)
    assert first <= 6 and all(ran[first + 1:first + 30])     # moved, and stays
    team_trials = len(trial_starts(ran[first:], False))
    assert team_trials <= 7                                  # back off: 32, 64, ... 1024
    assert len(ran) - sum(ran) - first == 2 * team_trials


def test_a_small_difference_does_not_move_the_team():
    # Noise: one thread measured 20% cheaper once is not a reason to leave the team
    # (one thread must win by 30%).
    assert sum(_core._simulate_team_choice(1.0, 0.8, 1000)) <= 20       # trials only
    assert sum(_core._simulate_team_choice(1.0, 0.6, 1000)) > 900


def test_the_team_comes_back_although_its_first_pass_wakes_its_threads():
    # After a busy spell on one thread, the partner threads sleep: the first team pass
    # pays for waking them (here 3x a whole pass: a small network).  Judged on that pass
    # alone the team would lose every trial and the network stay on one thread, 1.6x
    # slower; a trial's second pass is the one that counts.
    ran = _core._simulate_team_choice(1.0, 1.6, 2000, wake=3.0, start_single=True)
    back = ran.index(False)
    assert back <= 40 and sum(ran[back:]) <= 30          # back on the team, one-thread trials only


def test_the_choice_is_kept_per_kind_of_pass(rng):
    net = bp.Network([bp.Dense(8, 4, "relu"), bp.Dense(4, 3, "softmax")],
                     loss="cross_entropy", seed=0)
    x, y = rng.normal(size=(16, 8)), rng.integers(0, 3, 16)
    for _ in range(10):
        net.train_step(x, y)
    choices = net._engine._team_choice()
    assert set(choices) == {"forward", "backward", "training"}
    if bp.get_num_threads() > 1:
        assert choices["training"][1] > 0                    # the team's passes measured
        assert choices["forward"][1] == 0                    # no forward-only pass ran
