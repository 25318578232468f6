"""Regenerate the README's demo outputs from the demos themselves, so they cannot go stale.

    python tools/readme_outputs.py            # rewrite the blocks in README.md
    python tools/readme_outputs.py --check    # exit 1, with a diff, if a block differs

Each output block of the README that a demo prints is found by its first line (the
demo's table header) and replaced by what the demo prints now, from that header on.
The numbers depend on the SIMD level's rounding: the README's come from the `avx512`
build (`bp.simd_kernel()`), and the script says which level it ran.
"""
import argparse
import difflib
import pathlib
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
DEMOS = ["vanishing-gradients", "vanishing-gradients-in-time"]


def demo_table(name):
    """The demo's printed table: its output from the line starting with "network" on."""
    out = subprocess.run([sys.executable, "-m", "backprop", "demo", name], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("network"))
    return out[start:]


def replace_block(lines, table):
    """lines with the fenced block that starts with table's header replaced by table."""
    start = lines.index(table[0])
    end = lines.index("```", start)
    return lines[:start] + table + lines[end:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    import backprop as bp
    print(f"SIMD level: {bp.simd_kernel()}", file=sys.stderr)
    before = README.read_text().splitlines()
    after = before
    for name in DEMOS:
        after = replace_block(after, demo_table(name))
    if after == before:
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(
            [line + "\n" for line in before], [line + "\n" for line in after],
            "README.md", "README.md (regenerated)"))
        return 1
    README.write_text("\n".join(after) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
