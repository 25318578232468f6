# The kernels for CPUs with AVX2 and FMA: _kernels.pyx itself, compiled by setup.py with
# -mavx2 -mfma, so the compiler vectorises every element-wise loop (optimizer updates,
# activations, losses, normalisations) eight floats wide and the GEMM uses its AVX2
# kernels.  backprop/_simd.py decides which level the engine calls.
include "_kernels.pyx"
