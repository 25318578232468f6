"""Build the compiled core, ``backprop._core``, from ``src/backprop/_core.pyx``.

Everything about compilation lives here, once:

* OpenMP is probed for, never dropped silently.  Without it the build stops
  with an explanation, unless ``BACKPROP_SERIAL=1`` asks for a serial build
  (``backprop.openmp_enabled()`` then reports False).
* Cython directives are set here for the whole extension.  ``BACKPROP_DEBUG=1``
  turns bounds, wraparound and initialisation checks back on: the test suite
  is run against such a build in CI.
* ``BACKPROP_SANITIZE=address`` instruments the extension with AddressSanitizer.
* No ``-march=native``: the wheel must run on any x86-64.  The AVX2+FMA GEMM
  kernels carry their own ``target`` attributes and are chosen at run time.
"""
import os
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SERIAL = os.environ.get("BACKPROP_SERIAL", "") == "1"
DEBUG = os.environ.get("BACKPROP_DEBUG", "") == "1"
SANITIZE = os.environ.get("BACKPROP_SANITIZE", "")   # e.g. "address" (tools/asan.sh)

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
""")


def openmp_flags(compiler):
    """Return (compile_args, link_args) that enable OpenMP, or None if none work."""
    candidates = [(["/openmp"], [])] if compiler.compiler_type == "msvc" else [
        (["-fopenmp"], ["-fopenmp"]),
        (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),  # Apple clang + libomp
    ]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
                compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=link_args)
            except Exception:
                continue
            return compile_args, link_args
    return None


class BuildWithOpenMP(build_ext):
    def build_extensions(self):
        flags = None if SERIAL else openmp_flags(self.compiler)
        if flags is None and not SERIAL:
            sys.exit(
                "error: backprop needs a C compiler with OpenMP (gcc -fopenmp, or clang with "
                "libomp) and none was found.\n"
                "Install one, or build without threads by setting BACKPROP_SERIAL=1.")
        compile_args, link_args = flags or ([], [])
        for ext in self.extensions:
            ext.extra_compile_args += compile_args
            ext.extra_link_args += link_args
            ext.define_macros.append(("BACKPROP_OPENMP", "0" if SERIAL else "1"))
        super().build_extensions()


directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "nonecheck": DEBUG,
    "embedsignature": True,
}

optimise = ["-O1", "-g"] if DEBUG else ["-O3"]
sanitize = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else []
core = Extension(
    "backprop._core",
    ["src/backprop/_core.pyx"],
    include_dirs=[np.get_include(), "src/backprop"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=[] if sys.platform == "win32" else optimise + ["-fno-math-errno"] + sanitize,
    extra_link_args=sanitize,
)

setup(
    # force: the generated C depends on the directives above, which cythonize's
    # timestamp check cannot see (a debug build must never reuse release C, or back).
    ext_modules=cythonize([core], compiler_directives=directives, force=True),
    cmdclass={"build_ext": BuildWithOpenMP},
)
