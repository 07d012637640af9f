#!/usr/bin/env bash
# Fresh Debian 12 to a mounted demo volume in one command (run as root):
#   installs the build dependencies, builds envelopefs (Release), installs it to /usr/local,
#   creates a volume with the default local key provider and mounts it.
# Cipher dir: /var/lib/envelopefs-demo/cipher   Mountpoint: /mnt/envelopefs-demo
# Root key:   /etc/envelopefs/root.key (created on first init, mode 0600)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $EUID -eq 0 ]] || { echo "quickstart: run as root (it installs packages and mounts): su -c 'bash packaging/quickstart.sh', or sudo bash packaging/quickstart.sh" >&2; exit 1; }
bash packaging/install-deps.sh --runtime-only
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DENVELOPEFS_TESTS=OFF -DENVELOPEFS_BENCH=OFF >/dev/null
cmake --build build -j"$(nproc)"
cmake --install build >/dev/null
cipher=/var/lib/envelopefs-demo/cipher
mnt=/mnt/envelopefs-demo
if grep -q " $mnt fuse.envelopefs " /proc/self/mounts; then
  echo "already mounted at $mnt"
else
  [[ -f $cipher/envelopefs.conf ]] || envelopefs init "$cipher"
  mkdir -p "$mnt"
  # --allow-other: other users (a database's own user, a test suite dropping privileges) reach
  # files by their modes and owners, as on any local filesystem; without it FUSE refuses
  # everyone but root. The kernel checks permissions (default_permissions) either way.
  envelopefs mount --allow-other "$cipher" "$mnt"
fi
echo "hello from envelopefs" > "$mnt/hello.txt"
envelopefs status "$mnt"
echo
echo "mounted: $mnt (plaintext) over $cipher (ciphertext). Try: ls $cipher; cat $mnt/hello.txt"
echo "unmount with: envelopefs unmount $mnt"
