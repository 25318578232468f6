# The kernels for CPUs with AVX-512 (F, CD, BW, DQ, VL, as Skylake-X and every later
# Xeon, Zen 4 and Zen 5 have): _kernels.pyx itself, compiled by setup.py with those
# instruction sets, so element-wise loops run sixteen floats wide and the GEMM uses its
# AVX-512 kernels.  backprop/_simd.py decides which level the engine calls.
include "_kernels.pyx"
