"""Time one training step (forward + loss + backward + SGD update, float32) in backprop and
its peers, side by side, against the machine's sgemm peak; then the core's matmul against
numpy.matmul.

    python benchmarks/compare.py                   # every config but huge, 2 threads
    python benchmarks/compare.py --quick           # a short run (about a minute)
    python benchmarks/compare.py --configs huge --rounds 3 --no-matmul
    python benchmarks/compare.py --configs lenet,cnn-wide --no-matmul   # the convolutions
    python benchmarks/compare.py --configs lstm-mnist,lstm-big --no-matmul   # the LSTMs
    python benchmarks/compare.py --avx2-only       # every library capped at AVX2+FMA
    python benchmarks/compare.py --configs mnist-mid,wide,huge --bfloat16 --no-matmul

Method.  Every framework trains the same network (configs.py, built for each framework in
networks.py) from the same initial weights on one fixed batch: same sizes, batch, loss,
float32, plain SGD.  Before timing, each framework's first three losses must agree with
the NumPy reference's (so the networks really are the same), and after timing each loss
must have fallen.  Rounds are interleaved: each round times a block of steps of every
framework in turn (a different one first each round), and the table gives the median over
rounds, so a noisy neighbour hurts all alike.  Before each block the script sleeps PAUSE
seconds: OpenBLAS and OpenMP workers spin for a while after a call and would steal the
cores of whoever runs next.

Peers, each only if installed: a hand-written NumPy step (numpy_reference.py; convolutions
by im2col and one product), JAX on the CPU (a jit-compiled step, parameters donated;
lax.conv_general_dilated on NCHW; an LSTM's input projection for all steps at once, then
lax.scan over time), PyTorch eager (torch==2.13.0, the CPU build; NCHW tensors as users
write them, whose convolutions go to oneDNN when torch.backends.mkldnn is enabled, as
does nn.LSTM: the output says whether it is and which kernel ran; fused SGD, which
torch's docs rank fastest, or --torch-optim), scikit-learn's MLP partial_fit (plain MLP
configs only, its own initial weights; it has no convolution or recurrent layer).  Each
gets the thread count of --threads, and the output says how.  OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, set on this project's machines, would slow NumPy down: the script
re-executes itself without them before NumPy is loaded, and prints which OpenBLAS kernel
NumPy uses.

With --bfloat16, backprop also trains with its products in bfloat16 (bp.Network's
precision="bfloat16": operands rounded to bfloat16, float32 sums and weights) and PyTorch
under torch.autocast("cpu", dtype=torch.bfloat16), in the same interleaved rounds; a
second table sets them beside the float32 steps and against the machine's bfloat16 peak,
a loop of independent VDPBF16PS on every thread (bp._core._bfloat16_peak), timed once a
round as the sgemm peak is.  A bfloat16 step's first losses must agree with the
reference's to 2% (its products carry bfloat16's 8-bit mantissas).

GFLOP/s counts the products of the step only (configs.Config.gemm_flops: 2*B*in*out per
Dense, 2*B*Ho*Wo*Cout*Cin*k*k per Conv2d and 2*B*T*4H*(F+H) per LSTM forward, twice that
backward, without dX of the first layer) over the median step time.  The peak is
numpy.matmul on 2048^3 float32 with the same threads, timed once in every round beside
the steps, so each row is measured against the peak of its moment.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchenv  # noqa: E402  (imports nothing heavy: must run before NumPy loads)

if __name__ == "__main__":
    benchenv.drop_openblas_overrides(avx2_only="--avx2-only" in sys.argv)

import argparse  # noqa: E402
from functools import partial  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import backprop as bp  # noqa: E402
from configs import CONFIGS, LSTM, MATMUL_SHAPES, TARGET_US, Conv2d  # noqa: E402
from networks import STEPS, TORCH_IMPLEMENTATIONS, Unsupported, initial_weights  # noqa: E402

PAUSE = 0.25          # seconds before each timed block, so the previous library's spinners stop
PEERS = ("numpy", "jax", "torch", "sklearn")
IMPORTS = {"sklearn": "sklearn.neural_network"}    # what a peer's step loads
LABELS = {"numpy": "NumPy", "jax": "JAX jit", "torch": "PyTorch", "sklearn": "scikit-learn"}
AGREE_STEPS, AGREE_RTOL = 3, 1e-3   # float32 steps agreed to ~1e-6 relative when written
BF16_AGREE_RTOL = 2e-2              # bfloat16 operands: 2^-9 relative each
MIXED = {"backprop-bf16": "backprop", "torch-bf16": "torch"}   # bfloat16 step -> its float32 one


class Failure(Exception):
    """A framework's step failed a check; the run stops with this message."""


def installed(name):
    return importlib.util.find_spec(name) is not None


def build(config, frameworks, torch_impl):
    """{name: step} for the frameworks that can build `config`, and {name: reason} for
    those that cannot."""
    weights = initial_weights(config)
    steps, skipped = {}, {}
    for name in frameworks:
        options = {"implementation": torch_impl} if name.startswith("torch") else {}
        try:
            steps[name] = STEPS[name](config, weights, **options)
        except Unsupported as e:
            skipped[name] = str(e)
    return steps, skipped


def check_agreement(config, first_losses):
    """The networks are the same: their first losses match the reference's (scikit-learn,
    with its own initial weights, is left out)."""
    ref_name = "numpy" if "numpy" in first_losses else "backprop"
    ref = first_losses.get(ref_name)
    for name, losses in first_losses.items():
        if name == "sklearn" or ref is None:
            continue
        rtol = BF16_AGREE_RTOL if name in MIXED else AGREE_RTOL
        if not np.allclose(losses, ref, rtol=rtol, atol=0):
            raise Failure(f"{config.name}: {name}'s first losses {losses} differ from "
                          f"{ref_name}'s {ref}: not the same network")


def calibrate(step, seconds):
    """How many steps fill a block of about `seconds` (at least 3)."""
    start = time.perf_counter()
    for _ in range(3):
        step()
    per_step = (time.perf_counter() - start) / 3
    return max(3, min(100_000, int(seconds / per_step)))


def time_config(config, steps, rounds, block_seconds, peaks):
    """Median µs per step of each framework over interleaved rounds, the median GFLOP/s
    of each of `peaks` ({name: peak}, timed once per round) and each framework's median
    CPU time ÷ wall time over its blocks (the cores it kept busy: a check of its thread
    limit)."""
    first = {name: [step() for _ in range(AGREE_STEPS)] for name, step in steps.items()}
    check_agreement(config, first)
    counts = {name: calibrate(step, block_seconds) for name, step in steps.items()}
    samples, busy = {name: [] for name in steps}, {name: [] for name in steps}
    measured = {name: [] for name in peaks}
    names = list(steps)
    for r in range(rounds):
        # Each round starts with the next framework, so none always follows the same one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            time.sleep(PAUSE)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(counts[name]):
                step()
            wall = time.perf_counter() - start
            samples[name].append(wall / counts[name])
            busy[name].append((time.process_time() - cpu) / wall)
        for name, peak in peaks.items():
            time.sleep(PAUSE)
            measured[name].append(peak.gflops())
    for name, step in steps.items():
        last = step()
        if not last < first[name][0]:
            raise Failure(f"{config.name}: {name}'s loss did not fall "
                          f"({first[name][0]:.4g} -> {last:.4g})")
    us = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    return (us, {name: statistics.median(v) for name, v in measured.items()},
            {name: statistics.median(v) for name, v in busy.items()})


class SgemmPeak:
    """numpy.matmul on 2048^3 float32: the machine's practical float32 GEMM limit."""
    n = 2048

    def __init__(self):
        rng = np.random.default_rng(0)
        self.a, self.b = (rng.standard_normal((self.n, self.n), dtype=np.float32) for _ in range(2))
        self.out = np.empty((self.n, self.n), np.float32)
        np.matmul(self.a, self.b, out=self.out)          # OpenBLAS starts its threads

    def gflops(self):
        """GFLOP/s of one product."""
        start = time.perf_counter()
        np.matmul(self.a, self.b, out=self.out)
        return 2 * self.n ** 3 / (time.perf_counter() - start) / 1e9


class Bf16Peak:
    """Independent VDPBF16PS on every thread, no memory traffic: the CPU's bfloat16 limit."""

    def __init__(self, threads):
        self.threads = threads

    def gflops(self):
        return bp._core._bfloat16_peak(self.threads)


def fmt_us(us):
    return f"{us:,.1f}" if us < 1e4 else f"{us:,.0f}"


def fmt_ratio(ratio):
    digits = 2 if ratio < 10 else 1 if ratio < 100 else 0
    return f"{ratio:,.{digits}f}×"


def fmt_percent(fraction):
    return "<1%" if fraction < 0.01 else f"{fraction:.0%}"


def fmt_gflops(flops, us):
    g = flops / us / 1e3
    return f"{g:.3g}" if g < 10 else f"{g:.0f}"


def table_head(peers):
    head = ("| config | batch | target µs | backprop µs/step | samples/s | backprop GFLOP/s "
            "| sgemm peak GFLOP/s | % of peak |")
    head += "".join(f" {LABELS[p]} µs | {LABELS[p]} ÷ backprop | {LABELS[p]} GFLOP/s |"
                    for p in peers)
    return [head, "|" + "---|" * (8 + 3 * len(peers))]


def table_row(config, us, peers, peak):
    flops = config.gemm_flops()
    target = TARGET_US.get(config.name)
    ours = us.get("backprop")
    cells = [f"{config.name} ({config.describe()})", str(config.batch),
             f"{target:,}" if target else "—"]
    if ours is None:
        cells += ["skipped", "—", "—", f"{peak:.0f}", "—"]
    else:
        cells += [fmt_us(ours), f"{config.batch / ours * 1e6:,.0f}", fmt_gflops(flops, ours),
                  f"{peak:.0f}", fmt_percent(flops / ours / 1e3 / peak)]
    for p in peers:
        if p not in us:
            cells += ["—", "—", "—"]
            continue
        ratio = fmt_ratio(us[p] / ours) if ours is not None else "—"
        cells += [fmt_us(us[p]), ratio, fmt_gflops(flops, us[p])]
    return "| " + " | ".join(cells) + " |"


BF16_HEAD = ["| config | backprop float32 µs | backprop bfloat16 µs | bfloat16 ÷ float32 speed "
             "| bfloat16 GFLOP/s | bfloat16 peak GFLOP/s | % of bfloat16 peak "
             "| PyTorch autocast µs | PyTorch autocast ÷ backprop bfloat16 "
             "| fastest peer, either precision | its µs | it ÷ backprop bfloat16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def bf16_row(config, us, peak):
    """backprop's bfloat16 step beside its float32 one, its peers' in both precisions."""
    flops, ours, f32 = config.gemm_flops(), us.get("backprop-bf16"), us.get("backprop")
    if ours is None:
        return None
    cells = [f"{config.name} ({config.describe()})", fmt_us(f32) if f32 else "—", fmt_us(ours),
             fmt_ratio(f32 / ours) if f32 else "—", fmt_gflops(flops, ours),
             f"{peak:.0f}" if peak else "—",
             fmt_percent(flops / ours / 1e3 / peak) if peak else "—"]
    autocast = us.get("torch-bf16")
    cells += [fmt_us(autocast), fmt_ratio(autocast / ours)] if autocast else ["—", "—"]
    peers = {name: t for name, t in us.items() if not name.startswith("backprop")
             and name != "sklearn"}
    if peers:
        best = min(peers, key=peers.get)
        label = LABELS.get(best) or f"{LABELS[MIXED[best]]} autocast"
        cells += [label, fmt_us(peers[best]), fmt_ratio(peers[best] / ours)]
    else:
        cells += ["—", "—", "—"]
    return "| " + " | ".join(cells) + " |"


def matmul_table(rounds, quick):
    """GFLOP/s of bp.ops.matmul and numpy.matmul on MATMUL_SHAPES, interleaved rounds."""
    rng = np.random.default_rng(0)
    rows = ["| float32 product (m, n, k) | backprop GFLOP/s | NumPy GFLOP/s | backprop ÷ NumPy |",
            "|---|---|---|---|"]
    shapes = list(MATMUL_SHAPES.items())
    for name, (m, n, k, ta, tb) in shapes[:4] if quick else shapes:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        ours, theirs = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        runs = {"backprop": (partial(bp.ops.matmul, a, b, out=ours, trans_a=ta, trans_b=tb), []),
                "numpy": (partial(np.matmul, a.T if ta else a, b.T if tb else b, out=theirs), [])}
        for fn, _ in runs.values():
            fn()
        # float32 sums of k products of N(0, 1) numbers: entries ~ sqrt(k), rounding ~1e-6 of it
        if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.sqrt(k)):
            raise Failure(f"matmul {name}: bp.ops.matmul and numpy.matmul disagree")
        reps = max(3, int(0.05 * 100e9 / (2 * m * n * k)))
        for _ in range(rounds):
            for fn, acc in runs.values():
                time.sleep(PAUSE)
                fn()
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                acc.append((time.perf_counter() - start) / reps)
        g = {lib: 2 * m * n * k / statistics.median(acc) / 1e9 for lib, (_, acc) in runs.items()}
        rows.append(f"| {name} ({m}, {n}, {k}) | {g['backprop']:.0f} | {g['numpy']:.0f} | "
                    f"{g['backprop'] / g['numpy']:.2f} |")
    return rows


def versions(peers):
    parts = [f"Python {platform.python_version()}",
             f"backprop {bp.__version__} (SIMD kernel {bp.simd_kernel()})",
             f"numpy {np.__version__}"]
    for p in peers:
        if p != "numpy":
            parts.append(f"{p} {sys.modules[p].__version__}")
        if p == "torch":
            mkldnn = sys.modules["torch"].backends.mkldnn
            parts[-1] += (f" (torch.backends.mkldnn, oneDNN: available {mkldnn.is_available()}, "
                          f"enabled {mkldnn.enabled})")
    return "Versions: " + ", ".join(parts)


# Per kind of layer whose kernel torch picks: (what its aten ops' names contain, what
# torch's profiler calls the routing steps, not the kernel it chose, the oneDNN kernels).
TORCH_KERNELS = {
    Conv2d: ("conv", {"aten::conv1d", "aten::conv2d", "aten::convolution",
                      "aten::_convolution", "aten::convolution_backward"},
             {"aten::mkldnn_convolution"}),
    LSTM: ("rnn", {"aten::lstm"}, {"aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"}),
}


def torch_kernels(step, kind):
    """The aten ops of `kind` (a key of TORCH_KERNELS) that one step ran, oneDNN's marked,
    from torch's profiler.  Its tracer (Kineto) logs its start and stop on stderr: stderr
    is closed for that one step."""
    import torch
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with torch.autograd.profiler.profile() as prof:
                step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    word, dispatch, onednn = TORCH_KERNELS[kind]
    ran = sorted({e.name for e in prof.function_events if e.name.startswith("aten::")
                  and word in e.name and e.name not in dispatch})
    return [f"{op} (oneDNN)" if op in onednn else op for op in ran]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from {', '.join(CONFIGS)}; default: all but huge")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers to time when installed (default: all)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every framework")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds of short blocks, 4 matmul shapes")
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul table")
    parser.add_argument("--avx2-only", action="store_true",
                        help="cap every library at AVX2+FMA, as on a CPU without AVX-512 "
                             "(benchenv.AVX2_ONLY)")
    parser.add_argument("--torch-optim", choices=TORCH_IMPLEMENTATIONS, default="fused",
                        help="torch.optim.SGD's implementation (default: fused)")
    parser.add_argument("--bfloat16", action="store_true",
                        help="also time backprop with bfloat16 products and PyTorch under "
                             "torch.autocast(bfloat16), against the bfloat16 peak")
    parser.add_argument("--markdown", metavar="FILE", help="also write the output here")
    args = parser.parse_args(argv)
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if n != "huge"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    wanted = [p for p in args.peers.split(",") if p]
    if set(wanted) - set(PEERS):
        parser.error(f"unknown peers {sorted(set(wanted) - set(PEERS))}; choose from {PEERS}")
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be at least 1")
    rounds = 3 if args.quick else args.rounds
    block = 0.03 if args.quick else 0.2

    peers = [p for p in PEERS if p in wanted and installed(p)]
    how = {}
    if "jax" in peers:              # before anything else starts threads of its own
        _, how["jax"] = benchenv.start_jax(args.threads)
    for p in peers:                 # loaded now, so that the thread limits below reach them
        __import__(IMPORTS.get(p, p))
    how = {**benchenv.limit_threads(args.threads, peers, args.torch_optim), **how}
    peaks = {"sgemm": SgemmPeak()}
    mixed = []
    if args.bfloat16:
        mixed = ["backprop-bf16"] + (["torch-bf16"] if "torch" in peers else [])
        if bp.bfloat16_kernel() == "avx512_bf16":
            peaks["bf16"] = Bf16Peak(args.threads)

    lines = [benchenv.machine_line(), benchenv.load_line("at the start"), versions(peers),
             benchenv.environment_note(),
             *benchenv.blas_lines(),
             f"Threads ({args.threads}): " + "; ".join(f"{k}: {v}" for k, v in how.items()),
             (f"sgemm peak: numpy.matmul 2048^3 float32, {args.threads} threads, one product "
              "in each round beside the steps; the row's median is its 'sgemm peak' column"),
             (f"Median of {rounds} interleaved rounds; µs per step; ratio = peer time ÷ backprop "
              "time (> 1: backprop is faster); GFLOP/s = GEMM flops of the step ÷ step time "
              "(forward 2·B·in·out per Dense, 2·B·Ho·Wo·Cout·Cin·k·k per Conv2d, "
              "2·B·T·4H·(F+H) per LSTM, backward twice that, no dX for the first layer; "
              "element-wise work, pooling and gates included, not counted); % of peak = "
              "backprop GFLOP/s ÷ sgemm peak."),
             *([f"bfloat16 products: {bp.bfloat16_kernel()}; bfloat16 peak: "
                + ("independent VDPBF16PS on every thread, once a round"
                   if "bf16" in peaks else "none (no AVX512_BF16: emulated)")]
               if args.bfloat16 else []),
             "", *table_head(peers)]
    missing = [p for p in wanted if p not in peers]
    if missing:
        lines.insert(3, f"Not installed, not timed: {', '.join(missing)}")
    print("\n".join(lines), flush=True)
    notes, cores, bf16_rows = [], [], []
    try:
        for name in names:
            config = CONFIGS[name]
            steps, skipped = build(config, ["backprop", *peers, *mixed], args.torch_optim)
            notes += [f"{name}: {fw} not timed: {why}" for fw, why in skipped.items()]
            us, row_peaks, busy = time_config(config, steps, rounds, block, peaks)
            kinds = {type(spec) for spec, _ in config.traced()}
            for kind in TORCH_KERNELS if "torch" in steps else ():
                if kind not in kinds:
                    continue
                kernels = torch_kernels(steps["torch"], kind)
                notes.append(f"{name}: PyTorch's {kind.__name__} layers ran as "
                             f"{', '.join(kernels) or 'no aten op of theirs'}")
            row = table_row(config, us, peers, row_peaks["sgemm"])
            if mixed:
                bf16_rows.append(bf16_row(config, us, row_peaks.get("bf16")))
            cores.append(f"{name}: " + ", ".join(f"{fw} {b:.2f}" for fw, b in busy.items()))
            lines.append(row)
            print(row, flush=True)
    except Failure as e:
        sys.exit(f"compare.py: {e}")
    notes += ["Cores kept busy (process CPU time ÷ wall time over the timed blocks; spinning "
              "OpenMP/OpenBLAS threads count as busy):", *cores,
              benchenv.load_line("after the steps")]
    if bf16_rows:
        table = ["bfloat16 products (ratios > 1: backprop's bfloat16 step is faster):", "",
                 *BF16_HEAD, *filter(None, bf16_rows)]
        lines += [""] + table
        print("\n" + "\n".join(table), flush=True)
    lines += [""] + notes
    print("\n" + "\n".join(notes), flush=True)
    if not args.no_matmul:
        table = matmul_table(rounds, args.quick)
        lines += [""] + table
        print("\n" + "\n".join(table), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
