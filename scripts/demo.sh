#!/usr/bin/env bash
# Builds Baton, mounts the embedded default volume, writes and reads through it, checks
# the bytes, and unmounts. Run as root on Debian/Ubuntu with a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/demo.sh: run as root (baton mounts with mount(2))" >&2
    exit 1
fi

export BATON_HOME="${BATON_HOME:-/var/lib/baton}"
MNT="${MNT:-/mnt/baton-demo}"

echo "== building (release)"
cargo build --release --locked --bins
BATON=target/release/baton

mkdir -p "$MNT"
cleanup() { "$BATON" umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; }
trap cleanup EXIT

echo "== mounting the default volume at $MNT (BATON_HOME=$BATON_HOME)"
"$BATON" mount "$MNT" --background
"$BATON" status "$MNT" || true

echo "== writing and reading through the mount"
work=$(mktemp -d)
head -c $((64 << 20)) /dev/urandom > "$work/blob"
mkdir -p "$MNT/demo"
cp "$work/blob" "$MNT/demo/blob"
echo "hello from baton" > "$MNT/demo/hello.txt"
ls -l "$MNT/demo"
cmp "$work/blob" "$MNT/demo/blob"
grep -q "hello from baton" "$MNT/demo/hello.txt"
df -h "$MNT"
rm -rf "$work"

echo "== unmounting"
"$BATON" umount "$MNT"
trap - EXIT
echo "OK: 64 MiB written and read back identically through Baton"
