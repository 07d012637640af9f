#!/usr/bin/env bash
# Installs what envelopefs needs to build, run and test on Debian 12. Idempotent.
#   --runtime-only   just what building and mounting needs (no test databases, no fio)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
build_deps=(build-essential cmake pkg-config ccache libfuse3-dev fuse3 liburing-dev libssl-dev
            libxxhash-dev libsodium-dev libp11-kit-dev libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev
            libbenchmark-dev python3)
test_deps=(softhsm2 python3-pykmip openssl fio sqlite3 postgresql postgresql-contrib rocksdb-tools librocksdb-dev
           attr acl util-linux man-db groff-base dpkg-dev systemd xfsprogs btrfs-progs)
want=("${build_deps[@]}")
if [[ "${1:-}" != "--runtime-only" ]]; then want+=("${test_deps[@]}"); fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
