"""The OpenMP runtime is loaded with a short spin before sleeping (backprop/_waiting.py),
without leaving the setting in the environment or overriding a user's."""
import os
import subprocess
import sys

from backprop import _waiting

PROBE = """
import os, sys
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME"))
import backprop
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME"))
print(any("libgomp" in line or "libomp" in line for line in open("/proc/self/maps")))
"""


def run(env):
    clean = {k: v for k, v in os.environ.items() if k not in _waiting.USER_CHOICES}
    result = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


def test_the_short_spin_is_set_only_while_the_core_is_imported():
    before, after, loaded = run({})[:3]
    assert before == after == "None None"        # nothing left behind for child processes
    assert loaded == "True"                      # the runtime came with the core


def test_a_users_own_choice_stands():
    before, after, _ = run({"GOMP_SPINCOUNT": "123"})[:3]
    assert before == after == "123 None"


def test_the_context_sets_and_removes_the_settings(monkeypatch):
    for name in _waiting.USER_CHOICES:
        monkeypatch.delenv(name, raising=False)
    with _waiting.short_spin():
        assert {name: os.environ[name] for name in _waiting.SHORT_SPIN} == _waiting.SHORT_SPIN
    assert not any(name in os.environ for name in _waiting.SHORT_SPIN)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with _waiting.short_spin():
        assert "GOMP_SPINCOUNT" not in os.environ
