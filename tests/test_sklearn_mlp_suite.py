"""scikit-learn's own tests of its MLP, run on backprop's estimators.

scikit-learn ships them in its wheel (sklearn/neural_network/tests/test_mlp.py).  The
module is read from the installed scikit-learn, its one import of MLPClassifier and
MLPRegressor is swapped for backprop.estimators and nothing else is changed; it runs in
a fresh pytest beside a conftest.py that loads scikit-learn's fixtures (the
global_random_seed one).  Every test passes except those listed in PRIVATE, which read
or build scikit-learn's private state; the list is exact, so a test that starts or stops
passing fails here.
"""
import ast
import os
import pathlib
import subprocess
import sys
from xml.etree import ElementTree

import pytest

sklearn = pytest.importorskip("sklearn")

import backprop                                                          # noqa: E402

SOURCE = pathlib.Path(sklearn.__file__).parent / "neural_network" / "tests" / "test_mlp.py"
IMPORT = "from sklearn.neural_network import MLPClassifier, MLPRegressor"
SWAPPED = "from backprop.estimators import MLPClassifier, MLPRegressor"

_OPTIMIZER = ("reads mlp._optimizer.learning_rate, scikit-learn's private optimizer object; "
              "backprop's estimators train with network_.optimizer, whose rate is .lr")
PRIVATE = {     # test -> the private state it depends on
    "test_learning_rate_warmstart": _OPTIMIZER,
    "test_adaptive_learning_rate": _OPTIMIZER,
}


def _outcomes(junit):
    """{test id: ('passed' | 'failure' | 'error' | 'skipped', message)} from pytest's JUnit
    XML."""
    outcomes = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        kinds = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = ((kinds[0].tag, kinds[0].get("message", "")) if kinds
                                      else ("passed", ""))
    return outcomes


def test_scikit_learns_mlp_tests_pass_with_the_import_swapped(tmp_path):
    if not SOURCE.exists():
        pytest.skip(f"this scikit-learn ({sklearn.__version__}) ships no {SOURCE.name}")
    source = SOURCE.read_text()
    assert source.count(IMPORT) == 1, "the import line to swap changed"
    (tmp_path / "test_mlp.py").write_text(source.replace(IMPORT, SWAPPED))
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["sklearn.conftest"]\n')
    # The backprop this process tests, whatever the working directory of the child.
    here = str(pathlib.Path(backprop.__file__).parents[1])
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}
    junit = tmp_path / "results.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
         "test_mlp.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert junit.exists(), report
    assert SWAPPED in (tmp_path / "test_mlp.py").read_text()
    outcomes = _outcomes(junit)

    defined = {node.name for node in ast.parse(source).body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    ran = {name.split("[")[0] for name in outcomes}
    assert ran == defined, f"not collected: {sorted(defined - ran)}\n{report}"
    # A test may skip only for an optional module that is not installed (pandas, for
    # test_preserve_feature_names: pytest.importorskip's message).
    skipped = {name: message for name, (outcome, message) in outcomes.items()
               if outcome == "skipped" and not message.startswith("could not import")}
    assert not skipped, f"{skipped}\n{report}"
    failed = {name.split("[")[0] for name, (outcome, _) in outcomes.items()
              if outcome in ("failure", "error")}
    assert failed == set(PRIVATE), report
    passed = sum(outcome == "passed" for outcome, _ in outcomes.values())
    print(f"{passed} of {len(outcomes)} of scikit-learn {sklearn.__version__}'s test_mlp.py "
          "pass with the import swapped")
