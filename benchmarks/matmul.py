"""bp.ops.matmul against numpy.matmul (OpenBLAS) on float32, 1 and 2 threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/matmul.py
    python benchmarks/matmul.py --rounds 15 --threads 2 --shapes 1024^3 dX

Method: for each thread count and shape, rounds alternate the two libraries (which one
goes first alternates too); each round times a block of calls of each library, calibrated
to about --block seconds, and the table reports the median GFLOP/s over rounds and the
spread of the per-round ratio.  Between blocks the script sleeps --pause seconds (at
least 0.2): OpenBLAS's and OpenMP's idle workers spin after a call and would otherwise
steal the cores of the library timed next.  Each result is checked against the other
library's before timing.

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (set on some machines here to protect old
OpenBLAS builds) make NumPy run slower kernels than its users get; the script refuses
to run with either set, unless --keep-openblas-env is given (then the table says so).
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import backprop as bp

# name: (m, n, k, trans_a, trans_b, target ratio backprop/numpy)
SHAPES = {
    "1024^3": (1024, 1024, 1024, False, False, 0.95),
    "2048^3": (2048, 2048, 2048, False, False, 0.95),
    "XWt 256x1024.(1024x1024)T": (256, 1024, 1024, False, True, 1.1),
    "XWt 128x784.(512x784)T": (128, 512, 784, False, True, 1.1),
    "XWt 64x784.(128x784)T": (64, 128, 784, False, True, 1.1),
    "dX 128x512.512x784": (128, 784, 512, False, False, 0.95),
    "dW (512x128)T.128x784": (512, 784, 128, True, False, 0.95),
}
OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def machine():
    """The CPU model, its AVX-512 extensions, and the kernels both libraries run."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = sorted({w for w in f.read().split() if w.startswith("avx512")})
    except OSError:
        avx512 = []
    blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    openblas = (f"OpenBLAS {blas[0].get('version')} kernel {blas[0].get('architecture')}"
                if blas else "not OpenBLAS: " + ", ".join(i.get("internal_api", "?")
                                                          for i in threadpool_info()))
    config = bp._core._gemm_config()
    f32 = config["float32"]
    return [f"CPU: {model}, {os.cpu_count()} logical CPUs; {' '.join(avx512) or 'no AVX-512'}",
            f"NumPy {np.__version__}: {openblas}",
            f"backprop {bp.__version__}: kernel {config['kernel']}, float32 tile "
            f"{f32['mr']}x{f32['nr']}, KC {f32['kc']} MC {f32['mc']} NC {f32['nc']} "
            f"(caches L1 {config['caches']['L1'] >> 10} KiB, L2 {config['caches']['L2'] >> 10} "
            f"KiB, L3 {config['caches']['L3'] >> 20} MiB)"]


def operands(m, n, k, trans_a, trans_b, rng):
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    return a, b


def calls(m, n, k, trans_a, trans_b, rng):
    """One zero-argument call per library, each writing its own output array."""
    a, b = operands(m, n, k, trans_a, trans_b, rng)
    out_bp, out_np = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
    a_np, b_np = (a.T if trans_a else a), (b.T if trans_b else b)    # views, no copy

    def backprop_call():
        bp.ops.matmul(a, b, out=out_bp, trans_a=trans_a, trans_b=trans_b)

    def numpy_call():
        np.matmul(a_np, b_np, out=out_np)

    backprop_call()
    numpy_call()
    scale = np.abs(a_np).astype(np.float64) @ np.abs(b_np).astype(np.float64)
    if not (np.abs(out_bp.astype(np.float64) - out_np) <= 1e-5 * k * scale + 1e-6).all():
        sys.exit(f"backprop and numpy disagree on {m}x{n}x{k}: not timing a wrong result")
    return {"backprop": backprop_call, "numpy": numpy_call}


def time_block(call, reps):
    start = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - start) / reps


def measure(name, threads, rounds, block, pause, rng):
    m, n, k, ta, tb, target = SHAPES[name]
    flops = 2.0 * m * n * k
    with threadpool_limits(limits=threads):      # OpenBLAS and OpenMP pools alike
        bp.set_num_threads(threads)
        try:
            fns = calls(m, n, k, ta, tb, rng)
            per_call = min(time_block(fns["backprop"], 1) for _ in range(3))
            reps = max(1, int(block / per_call))
            order = list(fns)
            seconds = {lib: [] for lib in fns}
            for r in range(rounds):
                for lib in (order if r % 2 == 0 else order[::-1]):
                    time.sleep(pause)
                    seconds[lib].append(time_block(fns[lib], reps))
        finally:
            bp.set_num_threads(0)
    ratios = [nt / bt for bt, nt in zip(seconds["backprop"], seconds["numpy"])]
    gflops = {lib: flops / statistics.median(s) / 1e9 for lib, s in seconds.items()}
    return gflops, statistics.median(ratios), min(ratios), max(ratios), target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block", type=float, default=0.15, help="seconds per timed block")
    parser.add_argument("--pause", type=float, default=0.25,
                        help="seconds between blocks (at least 0.2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES),
                        help="names from the table, or a unique prefix of one")
    parser.add_argument("--keep-openblas-env", action="store_true",
                        help="run even with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set")
    args = parser.parse_args()
    if args.pause < 0.2:
        parser.error("--pause must be at least 0.2 s (spinning workers skew shorter pauses)")
    shapes = []
    for wanted in args.shapes:
        found = [s for s in SHAPES if s == wanted] or [s for s in SHAPES if s.startswith(wanted)]
        if len(found) != 1:
            parser.error(f"--shapes: {wanted!r} names none or several of {list(SHAPES)}")
        shapes += found
    set_variables = [v for v in OPENBLAS_VARIABLES if v in os.environ]
    if set_variables and not args.keep_openblas_env:
        sys.exit(f"{', '.join(set_variables)} set: NumPy would run slower OpenBLAS kernels than "
                 f"its users get.  Run\n  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python "
                 f"{' '.join(sys.argv)}\nor pass --keep-openblas-env to time it anyway.")

    for line in machine():
        print(line)
    if set_variables:
        print("WARNING: " + ", ".join(f"{v}={os.environ[v]}" for v in set_variables)
              + " (NumPy is not at its best)")
    print(f"float32, {args.rounds} interleaved rounds of ~{args.block} s blocks, "
          f"{args.pause} s pauses; GFLOP/s are medians over rounds\n")
    print(f"| {'shape':<27} | thr | backprop GF/s | numpy GF/s | ratio (min-max)    | target |")
    print(f"|{'-' * 29}|-----|---------------|------------|--------------------|--------|")
    rng = np.random.default_rng(0)
    misses = 0
    for threads in args.threads:
        for name in shapes:
            gflops, ratio, low, high, target = measure(name, threads, args.rounds, args.block,
                                                       args.pause, rng)
            met = ratio >= target
            misses += not met
            print(f"| {name:<27} | {threads:>3} | {gflops['backprop']:>13.0f} | "
                  f"{gflops['numpy']:>10.0f} | {ratio:5.3f} ({low:.2f}-{high:.2f}) | "
                  f">= {target:<4}{'' if met else ' MISS'} |", flush=True)
    print(f"\n{misses} of {len(shapes) * len(args.threads)} below target "
          "(a shared machine: rerun before believing a single miss)")


if __name__ == "__main__":
    main()
