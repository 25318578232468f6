"""The per-level kernels of the compiled core (backprop/_simd.py): which level the engine calls,
and that each trains a network as the others do.

The CPU's own levels come from /proc/cpuinfo (test_matmul.cpu_levels), independently of
NumPy's feature detection that _simd.py uses."""
import json
import pickle

import numpy as np
import pytest

import backprop as bp
from backprop import _simd
from test_matmul import KERNEL_NAMES, cpu_levels, run_python

AVX2 = {"AVX2": True, "FMA3": True}
AVX512 = {**AVX2, "AVX512F": True, "AVX512CD": True, "AVX512BW": True, "AVX512DQ": True,
          "AVX512VL": True}


@pytest.mark.parametrize("features, expected", [
    ({}, "generic"),
    ({"AVX2": True}, "generic"),                        # AVX2 without FMA
    (AVX2, "avx2"),
    ({**AVX512, "AVX512BW": False}, "avx2"),            # every AVX-512 part is needed
    (AVX512, "avx512"),
])
def test_the_level_is_the_best_the_cpu_has(features, expected):
    assert _simd.cpu_level(features) == expected


@pytest.mark.parametrize("requested, expected", [
    ("avx2", "avx2"), ("generic", "generic"), ("avx512", "avx512"),
    ("AVX2", "avx512"), ("sse9", "avx512"), ("", "avx512")])      # unknown: ignored
def test_backprop_simd_only_lowers_the_level(requested, expected):
    assert _simd.chosen_level(AVX512, requested) == expected
    assert _simd.chosen_level(AVX2, "avx512") == "avx2"             # never raised


def test_the_engine_calls_the_chosen_level():
    level = _simd.chosen_level()
    assert bp._core._kernels.__name__ == _simd.MODULES[level]
    assert bp.simd_kernel() == KERNEL_NAMES[level]


TRAIN = """
import json, numpy as np, backprop as bp
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 20)), rng.integers(0, 4, 64)
net = bp.Network([bp.Dense(20, 32, "relu"), bp.BatchNorm(32), bp.Dropout(0.2),
                  bp.Dense(32, 32, "gelu"), bp.LayerNorm(32), bp.Dense(32, 4, "softmax")],
                 loss="cross_entropy", optimizer=bp.Adam(lr=0.01), dtype="float64", seed=1)
losses = [net.train_step(x, y, l2=1e-3) for _ in range(5)]
print(json.dumps([bp._core._kernels.__name__, losses, net.params.tolist()]))
"""


def test_every_build_trains_alike():
    """Each level's build (all element-wise loops compiled for it, and its GEMM kernels)
    gives the same training run to float64 rounding."""
    runs = {level: json.loads(run_python(TRAIN, BACKPROP_SIMD=level)) for level in cpu_levels()}
    reference = runs[cpu_levels()[-1]]
    for level, (module, losses, params) in runs.items():
        assert module == _simd.MODULES[level]
        np.testing.assert_allclose(losses, reference[1], rtol=1e-12)
        np.testing.assert_allclose(params, reference[2], rtol=1e-9, atol=1e-12)


def test_functions_pickle_under_the_name_every_build_answers_to():
    """A function sent to another machine (joblib, Dask, Ray) must not name this
    machine's level, which the other CPU may not run."""
    for name in ("get_num_threads", "set_num_threads", "simd_kernel", "matmul"):
        function = getattr(bp._core, name)
        data = pickle.dumps(function)
        assert b"_kernels" not in data
        assert pickle.loads(data) is function
