"""Build the compiled core: the engine, ``backprop._core`` (``src/backprop/_core.pyx``),
once, and its kernels (``src/backprop/_kernels.pyx``) once per SIMD level.

Everything about compilation lives here, once:

* OpenMP is probed for, never dropped silently.  Without it the build stops
  with an explanation, unless ``BACKPROP_SERIAL=1`` asks for a serial build
  (``backprop.openmp_enabled()`` then reports False).
* Cython directives are set here for the whole extension.  ``BACKPROP_DEBUG=1``
  turns bounds, wraparound and initialisation checks back on: the test suite
  is run against such a build in CI.
* ``BACKPROP_SANITIZE=address`` instruments the extension with AddressSanitizer.
* No ``-march=native``: the wheel must run on any x86-64.  The kernels are built
  three times (baseline, AVX2+FMA, AVX-512) and the engine calls the best level the
  CPU runs, chosen at import (``backprop/_simd.py``, ``_level.pxd``).
"""
import glob
import os
import platform
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


def accepts(compiler, flag):
    """Whether the compiler compiles a trivial file with `flag`."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([source], output_dir=tmp, extra_postargs=[flag, "-Werror"])
        except Exception:
            return False
    return True


# GCC turns loops that copy or clear into calls to memcpy/memset.  A pixel's channels
# (convolution, pooling) are a few values: the call costs more than the copy.  The
# kernels call memcpy themselves where a copy is long.
KEEP_LOOPS = "-fno-tree-loop-distribute-patterns"


class BuildWithOpenMP(build_ext):
    def build_extensions(self):
        flags = None if SERIAL else openmp_flags(self.compiler)
        keep_loops = [KEEP_LOOPS] if accepts(self.compiler, KEEP_LOOPS) else []
        if flags is None and not SERIAL:
            sys.exit(
                "error: backprop needs a C compiler with OpenMP (gcc -fopenmp, or clang with "
                "libomp) and none was found.\n"
                "Install one, or build without threads by setting BACKPROP_SERIAL=1.")
        compile_args, link_args = flags or ([], [])
        generate_c(self.extensions, self.build_temp)
        for ext in self.extensions:
            ext.extra_compile_args += compile_args + keep_loops
            ext.extra_link_args += link_args
            ext.define_macros.append(("BACKPROP_OPENMP", "0" if SERIAL else "1"))
        self.parallel = self.parallel or os.cpu_count()    # the builds compile side by side
        super().build_extensions()


def generate_c(extensions, build_temp):
    """Cython's C for the extensions, generated here, when they are built (setup.py is
    also run just to read the metadata: translating then would be wasted time), the
    modules side by side.  Each configuration (release, debug, sanitizer, serial) writes
    its C into a directory of its own, so Cython's own check of the sources' times is
    enough, and the configuration's name is one more dependency of each extension: a
    switch of configuration rebuilds, a repeated build reuses what it can."""
    config = "-".join(["debug" if DEBUG else "release", SANITIZE or "plain",
                       "serial" if SERIAL else "openmp"])
    c_dir = os.path.join(build_temp, "cython-" + config)
    os.makedirs(c_dir, exist_ok=True)
    stamp = os.path.join(build_temp, "configuration")
    if not os.path.exists(stamp) or open(stamp).read() != config:
        with open(stamp, "w") as f:       # newer than every extension built before
            f.write(config)
    generated = cythonize(extensions, compiler_directives=directives, build_dir=c_dir,
                          nthreads=os.cpu_count() or 1)
    headers = glob.glob("src/backprop/*.h")     # kernels the C includes, unseen by Cython
    for ext, c in zip(extensions, generated):
        ext.sources = c.sources
        ext.depends += headers + [stamp]


directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "nonecheck": DEBUG,
    "embedsignature": True,
}

# A release build carries no debug information (-g0 overrides Python's -g): it was most of
# each unstripped module's size (13.9 MB for the three whole-core builds of 2026-12, 2.4 MB
# without).  The debug and sanitizer builds keep it, for their reports.
optimise = ["-O1", "-g"] if DEBUG else ["-O3", "-g" if SANITIZE else "-g0"]
sanitize = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"] if SANITIZE else []

# The kernels are compiled once per SIMD level, so that the compiler vectorises every
# element-wise loop as wide as the CPU allows; backprop/_simd.py picks the level the CPU
# runs best.  BACKPROP_BUILD_LEVEL tells the GEMM which micro-kernels belong to the level.
# Only GCC and Clang on x86-64 get the levels; elsewhere `_kernels` is the only one.  The
# engine (checking, buffers, the classes users hold) is compiled once, for any CPU: it has
# no loop that wider vectors would speed up.
LEVELS = {"_kernels": (0, []),
          "_kernels_avx2": (1, ["-mavx2", "-mfma"]),
          "_kernels_avx512": (2, ["-mavx2", "-mfma", "-mavx512f", "-mavx512cd", "-mavx512bw",
                                  "-mavx512dq", "-mavx512vl"])}
X86_64 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def extension(name, macros=(), flags=()):
    return Extension(
        f"backprop.{name}",
        [f"src/backprop/{name}.pyx"],
        include_dirs=[np.get_include(), "src/backprop"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), *macros],
        extra_compile_args=([] if sys.platform == "win32"
                            else optimise + ["-fno-math-errno", *flags] + sanitize),
        extra_link_args=list(sanitize),
    )


def kernels(name):
    level, flags = LEVELS[name]
    return extension(name, [("BACKPROP_BUILD_LEVEL", str(level))], flags)


# The AVX-512 kernels first: they take longest to compile, and the builds share the cores.
modules = [kernels(name) for name in (reversed(LEVELS) if X86_64 else ["_kernels"])]
modules.insert(1, extension("_core"))

setup(
    ext_modules=modules,
    cmdclass={"build_ext": BuildWithOpenMP},
)
