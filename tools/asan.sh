#!/usr/bin/env bash
# Run the test suite against an AddressSanitizer build of the extension.
#
#   bash tools/asan.sh [pytest args]
#
# Builds backprop with -fsanitize=address (and Cython's bounds checks on) into a scratch
# venv, preloads gcc's libasan into Python (which itself is not instrumented), and runs
# the tests.  Leak detection is off: CPython keeps objects alive at exit by design.
# Any invalid read or write in a kernel stops the run with a report and exit code 1.
# allocator_may_return_null: the tests ask for terabytes on purpose (a failed allocation
# must raise MemoryError); ASan would otherwise end the process silently instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet pytest hypothesis threadpoolctl matplotlib tqdm
BACKPROP_SANITIZE=address BACKPROP_DEBUG=1 \
  "$venv/bin/pip" install --quiet --no-deps --force-reinstall .
"$venv/bin/pip" install --quiet numpy
# libstdc++ is preloaded too, so ASan can intercept C++ exceptions thrown by other
# extensions (matplotlib's); without it ASan aborts on the first throw.
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
