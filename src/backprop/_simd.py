"""Import the build of the compiled core that this CPU runs fastest, as backprop._core.

setup.py compiles ``_core.pyx`` once per SIMD level on x86-64: ``_core`` for baseline
x86-64 (SSE2), ``_core_avx2`` with AVX2 and FMA, ``_core_avx512`` with AVX-512 F, CD, BW,
DQ and VL.  The whole core is compiled at each level, not only the GEMM kernels, so that
every element-wise loop (optimizer updates, activations, losses, normalisations) is
vectorised as wide as the CPU allows; one wheel still serves every x86-64.  The choice
is made once, here, before anything imports ``backprop._core``, from the CPU features
NumPy detects (which include the operating system's support for the wider registers):

    BACKPROP_SIMD=avx512|avx2|generic   caps the level (it never raises it past what
                                        the CPU has; other values are ignored)

This choice is the gate: importing ``_core_avx512`` directly on a CPU without AVX-512
may stop the process with an illegal instruction before the build's own check (at the
end of its initialisation, ImportError) is reached.  Elsewhere (ARM, Windows, or a
build without the variants) ``_core`` is the only build.
"""
import importlib
import os
import sys
import warnings

LEVELS = ("generic", "avx2", "avx512")            # lowest first
MODULES = {"generic": "backprop._core", "avx2": "backprop._core_avx2",
           "avx512": "backprop._core_avx512"}
NEEDS = {"avx2": ("AVX2", "FMA3"),
         "avx512": ("AVX2", "FMA3", "AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL")}


def _cpu_features():
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                       # NumPy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return __cpu_features__


def cpu_level(features=None):
    """The highest level whose instructions the CPU (and its OS) supports."""
    features = _cpu_features() if features is None else features
    best = "generic"
    for level in LEVELS[1:]:
        if all(features.get(name, False) for name in NEEDS[level]):
            best = level
    return best


def chosen_level(features=None, requested=None):
    """The CPU's level, lowered to BACKPROP_SIMD when that names a lower one."""
    level = cpu_level(features)
    requested = os.environ.get("BACKPROP_SIMD") if requested is None else requested
    if requested in LEVELS and LEVELS.index(requested) < LEVELS.index(level):
        level = requested
    return level


def load_core():
    """Import the chosen build and make it backprop._core (a no-op once done)."""
    if "backprop._core" in sys.modules:
        return sys.modules["backprop._core"]
    level = chosen_level()
    while True:
        try:
            module = importlib.import_module(MODULES[level])
            break
        except ImportError as error:
            if level == "generic":
                raise
            if not isinstance(error, ModuleNotFoundError):   # not built here: no news
                warnings.warn(f"backprop: the {level} build of the core does not load "
                              f"({error}); a lower level's build is used, which is slower",
                              RuntimeWarning, stacklevel=3)
            level = LEVELS[LEVELS.index(level) - 1]
    # Functions pickle by reference (joblib, Dask and Ray send them to other machines,
    # whose CPUs may lack this build's instructions): they must name backprop._core,
    # which every machine resolves to its own build.  (The compiled classes' module names
    # cannot change; they are never pickled: Networks and optimizers pickle as data.)
    for value in vars(module).values():
        if callable(value) and not isinstance(value, type) \
                and getattr(value, "__module__", None) == module.__name__:
            value.__module__ = "backprop._core"
    sys.modules["backprop._core"] = module
    sys.modules["backprop"]._core = module
    return module
