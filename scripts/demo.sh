#!/usr/bin/env bash
# Builds Baton, mounts the embedded default volume, writes and reads through it, checks
# the bytes, upgrades the client three times and kills it (kill -9) twice while an application
# appends and reads, checks that the application saw no error and lost no record, and
# unmounts. Run as root on Debian/Ubuntu with a Rust toolchain.
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

echo "== live upgrades while an application appends and reads"
# The application: appends numbered records and re-reads the file, failing on the first
# error it sees.
rm -f "$MNT/demo/log" "$MNT/demo/stop" "$MNT/demo/count"
(
    set -e
    i=0
    while [ ! -e "$MNT/demo/stop" ]; do
        i=$((i + 1))
        echo "record $i" >> "$MNT/demo/log"
        tail -n 1 "$MNT/demo/log" | grep -qx "record $i"
        ls "$MNT/demo" > /dev/null
    done
    echo "$i" > "$MNT/demo/count"
) &
app=$!
sleep 1
for n in 1 2 3; do
    "$BATON" upgrade "$MNT" --binary target/release/baton-fs
    sleep 1
done
echo "== kill -9 of the client, twice, while the application goes on"
for n in 1 2; do
    pid=$("$BATON" status "$MNT" --json | grep -o '"client_pid": *[0-9]*' | grep -o '[0-9]*$')
    kill -9 "$pid"
    echo "killed client pid $pid"
    sleep 1
done
touch "$MNT/demo/stop"
if ! wait "$app"; then
    echo "FAILED: the application saw an error during the upgrades" >&2
    exit 1
fi
count=$(cat "$MNT/demo/count")
if ! seq 1 "$count" | sed 's/^/record /' | cmp -s - "$MNT/demo/log"; then
    echo "FAILED: the log does not hold records 1..$count in order" >&2
    exit 1
fi
echo "the application appended and read back $count records across 3 upgrades and 2 kills, no error"
"$BATON" status "$MNT"

echo "== unmounting"
"$BATON" umount "$MNT"
trap - EXIT
echo "OK: 64 MiB written and read back identically; 3 live upgrades and 2 kill -9, no application error"
