#!/usr/bin/env bash
# Builds the Debian package envelopefs_VERSION_ARCH.deb (Release, installs under /usr: the
# binary, mount.fuse.envelopefs, the man page and envelopefs@.service) and prints its path.
#   bash packaging/build-deb.sh [OUTDIR]        then: apt-get install ./envelopefs_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-build-deb}")
bash packaging/install-deps.sh --runtime-only
command -v dpkg-shlibdeps >/dev/null || { apt-get update -qq; apt-get install -y -qq dpkg-dev >/dev/null; }
cmake -S . -B build-deb -DCMAKE_BUILD_TYPE=Release -DENVELOPEFS_TESTS=OFF -DENVELOPEFS_BENCH=OFF >/dev/null
cmake --build build-deb -j"$(nproc)"
mkdir -p "$out"
(cd build-deb && cpack -G DEB -B "$out" >/dev/null)
ls "$out"/envelopefs_*.deb
