"""The benchmark scripts' environment: the machine, OpenBLAS overrides, thread limits.

Import this module before NumPy: `drop_openblas_overrides` must run before any library
that loads OpenBLAS, so it imports nothing heavy itself.
"""
import os
import subprocess
import sys

# Set on this project's machines to protect old OpenBLAS builds; they make a current
# NumPy's OpenBLAS pick its Haswell kernels on an AVX-512 CPU (about half the sgemm speed).
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REMOVED = "BACKPROP_BENCH_REMOVED_ENV"     # what the re-executed script was started with
# An AVX2-only CPU (Zen 3, Haswell to Skylake client) emulated on an AVX-512 one: every
# library capped at AVX2+FMA, through the variable each reads when it loads.  The cores
# stay this machine's (caches, clocks, two FMA pipes), so it shows the code paths, not
# a Zen 3's speed.
AVX2_ONLY = {"BACKPROP_SIMD": "avx2", "OPENBLAS_CORETYPE": "Haswell",
             "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}


def drop_openblas_overrides(avx2_only=False):
    """Re-execute this script without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if either is set
    (or, with avx2_only, with exactly the AVX2_ONLY caps).

    OpenBLAS reads them once, when it is loaded, so they must be gone from the process's
    environment before NumPy (or anything else linking OpenBLAS) is imported: the script
    starts again with a cleaned environment.  Benchmarks only; tests and CI keep them.
    """
    wanted = AVX2_ONLY if avx2_only else {}
    found = {name: os.environ[name] for name in OPENBLAS_OVERRIDES
             if name in os.environ and os.environ[name] != wanted.get(name)}
    missing = {name: value for name, value in wanted.items() if os.environ.get(name) != value}
    if not found and not missing:
        return
    if "numpy" in sys.modules:
        raise RuntimeError("drop_openblas_overrides must run before numpy is imported")
    env = {k: v for k, v in os.environ.items() if k not in found}
    env.update(wanted)
    env[_REMOVED] = " ".join(f"{k}={v}" for k, v in found.items())
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def environment_note():
    """One line saying what was removed from the environment, or that nothing was set."""
    removed = os.environ.get(_REMOVED)
    note = (f"Environment: removed {removed} (re-executed without them)" if removed else
            f"Environment: {' and '.join(OPENBLAS_OVERRIDES)} not set")
    if all(os.environ.get(name) == value for name, value in AVX2_ONLY.items()):
        note = ("Environment: an AVX2-only CPU emulated, every library capped at AVX2 ("
                + ", ".join(f"{k}={v}" for k, v in AVX2_ONLY.items()) + ")")
    return note


def machine_line():
    """CPU model (lscpu), AVX-512 flags (/proc/cpuinfo) and CPUs usable by this process."""
    model, family = _lscpu_model()
    flags = sorted({flag for flag in _cpu_flags() if flag.startswith("avx512")})
    simd = f"AVX-512 ({' '.join(flags)})" if flags else (
        "no AVX-512, AVX2" if "avx2" in _cpu_flags() else "no AVX-512, no AVX2")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"Machine: {model}{family}; {simd}; {cpus} CPUs usable"


def load_line(when):
    """The 1-minute load average (other processes on the 2 shared cores skew every timing)."""
    return f"Load average {when}: {os.getloadavg()[0]:.2f} (1 min)"


def _lscpu_model():
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    model = fields.get("Model name") or _cpuinfo_field("model name") or "unknown CPU"
    family = (f" (family {fields['CPU family']}, model {fields['Model']})"
              if "CPU family" in fields and "Model" in fields else "")
    return model, family


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags():
    return set((_cpuinfo_field("flags") or "").split())


def start_jax(threads):
    """Import JAX and create its CPU client with a pool of min(threads, CPUs) threads.

    XLA:CPU sizes its thread pool from the CPU affinity mask when the client is created
    (JAX's maintainers name the mask as the way to limit it); XLA_FLAGS such as
    --xla_cpu_multi_thread_eigen=false no longer limit it (measured here with jax 0.10:
    a 2048^3 product still used 2 cores).  So the calling thread is narrowed to `threads`
    CPUs while the client starts, then given its CPUs back; the pool's threads keep the
    narrowed mask.  Returns (jax module, how its threads were set).
    """
    cpus = sorted(os.sched_getaffinity(0))
    narrowed = threads < len(cpus)
    if narrowed:
        os.sched_setaffinity(0, cpus[:threads])
    try:
        import jax
        jax.config.update("jax_platforms", "cpu")
        jax.devices()                           # creates the CPU client and its pool
    finally:
        if narrowed:
            os.sched_setaffinity(0, cpus)
    how = (f"CPU client created with affinity {cpus[:threads]} (pool of {threads})" if narrowed
           else f"CPU client over all {len(cpus)} CPUs (its default pool, = threads)"
           if threads == len(cpus) else
           f"only {len(cpus)} CPUs: its pool cannot grow to {threads}")
    return jax, how


def limit_threads(threads, peers, torch_optim=None):
    """Give every library `threads` threads; return {name: how it was done}.

    Call it once every peer is imported: threadpoolctl limits the BLAS and OpenMP
    libraries loaded at that moment (NumPy's and SciPy's OpenBLAS, the OpenMP runtimes).
    """
    import backprop as bp
    bp.set_num_threads(threads)
    how = {"backprop": f"bp.set_num_threads({threads}) -> {bp.get_num_threads()}"}
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads)
        blas = "threadpoolctl.threadpool_limits"
    except ImportError:
        blas = "threadpoolctl missing: BLAS threads NOT limited"
    how["numpy"] = f"{blas}({threads}) on its OpenBLAS"
    if "torch" in peers:
        import torch
        torch.set_num_threads(threads)
        how["torch"] = f"torch.set_num_threads({threads}) -> {torch.get_num_threads()}"
        if torch_optim:
            how["torch"] += f", torch.optim {torch_optim} implementation"
    if "sklearn" in peers:
        how["sklearn"] = f"{blas}({threads}) on NumPy's/SciPy's OpenBLAS and its OpenMP"
    return how


def blas_lines():
    """Each loaded BLAS: internal_api, architecture (the kernel it chose), num_threads."""
    try:
        import threadpoolctl
    except ImportError:
        return ["BLAS: threadpoolctl not installed, kernels unknown"]
    lines = []
    for info in threadpoolctl.threadpool_info():
        if info["user_api"] != "blas":
            continue
        path = info.get("filepath", "")
        owner = next((lib for lib in ("numpy", "scipy", "torch", "sklearn") if f"/{lib}" in path),
                     os.path.basename(path))
        lines.append(f"BLAS of {owner}: internal_api={info['internal_api']} "
                     f"version={info.get('version')} architecture={info.get('architecture')} "
                     f"num_threads={info['num_threads']}")
    return lines or ["BLAS: none loaded"]
