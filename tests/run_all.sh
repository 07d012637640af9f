#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (run as root; mounts need /dev/fuse):
# installs dependencies, builds, runs ctest (unit and integration tests).
#   BUILD_TYPE=asan tests/run_all.sh   runs the same suite under ASan+UBSan (build dir build-asan)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $EUID -eq 0 ]] || { echo "run_all: run as root (it installs packages, mounts volumes and loop devices): su -c 'bash tests/run_all.sh', or sudo bash tests/run_all.sh" >&2; exit 1; }
bash packaging/install-deps.sh
type=${BUILD_TYPE:-Release}
dir=build; [[ $type == asan ]] && dir=build-asan
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" -DENVELOPEFS_TESTS=ON -DENVELOPEFS_BENCH=ON >/dev/null
cmake --build "$dir" -j2
cd "$dir"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
ctest -j2 --output-on-failure
