"""Choose the kernels of the SIMD level this CPU runs fastest, for the compiled core.

The engine, ``backprop._core``, is compiled once; setup.py compiles its kernels
(``_kernels.pyx``) once per SIMD level on x86-64: ``_kernels`` for baseline x86-64
(SSE2), ``_kernels_avx2`` with AVX2 and FMA, ``_kernels_avx512`` with AVX-512 F, CD,
BW, DQ and VL.  Every kernel is compiled at each level, not only the GEMM's, so that
every element-wise loop (optimizer updates, activations, losses, normalisations) is
vectorised as wide as the CPU allows; one wheel still serves every x86-64.  The engine
asks here, as it is imported, and calls the chosen module's table (_level.pxd).  The
choice comes from the CPU features NumPy detects (which include the operating system's
support for the wider registers):

    BACKPROP_SIMD=avx512|avx2|generic   caps the level (it never raises it past what
                                        the CPU has; other values are ignored)

This choice is the gate: importing ``_kernels_avx512`` directly on a CPU without AVX-512
may stop the process with an illegal instruction before the module's own check (early in
its initialisation, ImportError) is reached.  Elsewhere (ARM, Windows, or a
build without the levels) ``_kernels`` is the only one.
"""
import importlib
import os
import warnings

LEVELS = ("generic", "avx2", "avx512")            # lowest first
MODULES = {"generic": "backprop._kernels", "avx2": "backprop._kernels_avx2",
           "avx512": "backprop._kernels_avx512"}
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


def load_kernels():
    """Import the chosen level's kernels (or, where that module is missing or refuses
    this CPU, the next level down's)."""
    level = chosen_level()
    while True:
        try:
            return importlib.import_module(MODULES[level])
        except ImportError as error:
            if level == "generic":
                raise
            if not isinstance(error, ModuleNotFoundError):   # not built here: no news
                warnings.warn(f"backprop: the {level} kernels do not load ({error}); a "
                              "lower level's are used, which is slower",
                              RuntimeWarning, stacklevel=3)
            level = LEVELS[LEVELS.index(level) - 1]
